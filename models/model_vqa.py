"""ALBEF VQA model: fusion encoder over (question, image) + causal answer decoder; answers ranked from a list."""
import torch
import torch.nn.functional as F

from models.base import ALBEFBase, BertLMHeadModel, BertModel
from models.batch import concepts_of
from models.xbert import SharedImageKV
from schema import value


class ALBEF(ALBEFBase):
    """Training: ``forward(batch, alpha)`` -> ``{"loss_vqa": loss}``; the batch has ``question_ids`` /
    ``question_mask``, the flattened ``answer_ids`` / ``answer_mask`` with their ``weights``, and ``k[b]``: how
    many answers belong to question ``b``. Inference: ``answer(image, question_ids, question_mask,
    answer_list_ids, answer_list_mask, k_test)`` -> (topk_ids, topk_probs).
    """

    def __init__(self, config, tokenizer=None):
        super().__init__()
        bc = self.build_encoders(config, text_cls=BertModel)
        # decoder: num_hidden_layers - fusion_layer layers, all cross-attending to question states
        dec_bc = bc.replace(fusion_layer=0, num_hidden_layers=bc.num_hidden_layers - bc.fusion_layer,
                            encoder_width=bc.hidden_size)
        self.text_decoder = BertLMHeadModel(dec_bc)
        if value(config, "text_decoder"):
            from models.checkpoint import init_text_encoder
            init_text_encoder(self.text_decoder, config["text_decoder"], config_key="text_decoder")
        self.distill = value(config, "distill") is not False
        # released vqa.pth was fine-tuned before ALBEF passed alpha to the decoder (spec §6.2)
        self.decoder_distill = value(config, "decoder_distill")
        # released numbers count the first answer token twice when ranking (spec §6.2 step 4)
        self.rank_double_count = value(config, "rank_answer_double_count")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer is not None else 0
        if self.distill:
            self.make_momentum("visual_encoder", "text_encoder", "text_decoder")

    def encode_question(self, image, q_ids, q_mask, momentum=False, concepts=None, rows=None):
        """The questions' fused states; with ``rows``, ``image`` holds each distinct image once and ``rows`` [B]
        each question's (its tokens and each fusion layer's keys and values computed once)."""
        bert = self.text_encoder_m if momentum else self.text_encoder
        image_embeds = self.image_tokens(image, concepts, momentum)
        atts = self.image_atts(image_embeds, concepts)
        if rows is not None:
            image_embeds, atts = SharedImageKV(image_embeds)[rows], atts[rows]
        return bert(input_ids=q_ids, attention_mask=q_mask, encoder_hidden_states=image_embeds,
                    encoder_attention_mask=atts).last_hidden_state

    @torch.no_grad()
    def answer(self, image, q_ids, q_mask, a_ids, a_mask, k, concepts=None, rows=None):
        states = self.encode_question(image, q_ids, q_mask, concepts=concepts, rows=rows)
        return self.rank_answer(states, q_mask, a_ids, a_mask, k)

    def forward(self, batch, alpha=0.0):
        image, q_ids, q_mask = batch["image"], batch["question_ids"], batch["question_mask"]
        a_ids, a_mask, weights, concepts = batch["answer_ids"], batch["answer_mask"], batch["weights"], concepts_of(batch)
        k = torch.as_tensor(batch["k"], device=image.device)
        n = a_ids.shape[0]   # sum(k), known on the host: repeat_interleave needs no device sync
        targets = a_ids.masked_fill(a_ids == self.pad_token_id, -100)
        states = self.encode_question(image, q_ids, q_mask, concepts=concepts).repeat_interleave(k, dim=0,
                                                                                                  output_size=n)
        atts = q_mask.repeat_interleave(k, dim=0, output_size=n)
        soft = None
        if self.distill:
            with torch.no_grad():
                self._momentum_update()
                states_m = self.encode_question(image, q_ids, q_mask, momentum=True,
                                                concepts=concepts).repeat_interleave(k, dim=0, output_size=n)
                logits_m = self.text_decoder_m(a_ids, attention_mask=a_mask, encoder_hidden_states=states_m,
                                               encoder_attention_mask=atts, return_logits=True)
                soft = F.softmax(logits_m.float(), dim=-1)
        use_alpha = alpha if (self.distill and self.decoder_distill) else 0.0
        out = self.text_decoder(a_ids, attention_mask=a_mask, encoder_hidden_states=states,
                                encoder_attention_mask=atts, labels=targets, soft_labels=soft, alpha=use_alpha,
                                reduction="none")
        return {"loss_vqa": (weights * out.loss).sum() / image.shape[0]}

    @torch.no_grad()
    def rank_answer(self, question_states, question_atts, answer_ids, answer_atts, k):
        """Top-k candidates by first-token probability, re-ranked by the full answer likelihood."""
        nq = question_states.shape[0]
        start = answer_ids[0, 0].repeat(nq, 1)
        first = self.text_decoder(start, encoder_hidden_states=question_states,
                                  encoder_attention_mask=question_atts).logits[:, 0, :]
        prob_first = F.softmax(first.float(), dim=1).index_select(1, answer_ids[:, 1])
        k = min(k, answer_ids.shape[0])
        topk_probs, topk_ids = prob_first.topk(k, dim=1)
        ids = answer_ids.index_select(0, topk_ids.view(-1))
        atts = answer_atts.index_select(0, topk_ids.view(-1))
        # the candidates' common padding is never read (masked keys, -100 labels): cut it (one host sync)
        n = int(atts.sum(1).max())
        ids, atts = ids[:, :n], atts[:, :n]
        targets = ids.masked_fill(ids == self.pad_token_id, -100)
        # each question's states projected to keys and values once for its k candidates
        rows = torch.arange(nq, device=ids.device).repeat_interleave(k)
        out = self.text_decoder(ids, attention_mask=atts, encoder_hidden_states=SharedImageKV(question_states)[rows],
                                encoder_attention_mask=question_atts[rows], labels=targets, reduction="none")
        log_probs = -out.loss.view(nq, k)
        if self.rank_double_count:
            log_probs = log_probs + topk_probs.log()
        probs = F.softmax(log_probs, dim=-1)
        order = probs.argsort(dim=1, descending=True)
        return topk_ids.gather(1, order), probs.gather(1, order)
