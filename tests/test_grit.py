"""GRIT-VLP grouping: the walk, the collector, the next epoch's order and the grouped sampler."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataset.grit import (GritCollector, GroupedSampler, batch_hardness, greedy_walk, neighbour_recall, neighbours,
                          next_epoch_order, order_stats, reference_walk, walk_similarities)


def test_walk_follows_hand_made_nearest_neighbours():
    # image features = identity, so sim[image i, text j] = s[i, j]
    g = torch.Generator().manual_seed(0)
    s = torch.rand(6, 6, generator=g) * 0.5
    s[0, 3] = s[5, 3] = s[5, 1] = s[4, 1] = s[4, 2] = 0.9
    # image 0 -> text 3 -> image 5 (best for text 3 among unvisited) -> text 1 -> image 4 -> last left: 2
    assert greedy_walk(torch.eye(6), s.t(), start=0).tolist() == [0, 3, 5, 1, 4, 2]


@pytest.mark.parametrize("m", [1, 2, 3, 8, 65, 128])
def test_walk_is_a_permutation_and_equals_the_original_procedure(m):
    g = torch.Generator().manual_seed(m)
    img = F.normalize(torch.randn(m, 16, generator=g), dim=1)
    txt = F.normalize(img + 0.5 * torch.randn(m, 16, generator=g), dim=1)
    for start in {0, m // 2, m - 1}:
        walk = greedy_walk(img, txt, start)
        assert sorted(walk.tolist()) == list(range(m))
        assert walk.tolist() == reference_walk(img, txt, start).tolist()


def test_walk_stays_a_permutation_across_a_tight_cluster_and_far_outliers():
    # leaving the cluster, every unvisited similarity is far below the visited ones: at GRIT's small
    # temperatures the original's softmax row is all zeros there and its choice is a tie-break
    img = torch.cat([torch.ones(6, 4), -torch.ones(2, 4)]) + 1e-3 * torch.arange(32.0).view(8, 4)
    img = F.normalize(img, dim=1)
    walk = greedy_walk(img, img.clone(), start=0)
    assert sorted(walk.tolist()) == list(range(8))


def test_collector_groups_every_full_queue_and_the_leftover():
    torch.manual_seed(0)
    col = GritCollector(queue_size=48, search_space=16, dim=16, batch_size=8, seed=3, device="cpu")
    col.start_epoch(0)
    pushed = []
    for step in range(13):   # queue full after 6 and 12 steps; 1 step (8 pairs) left at the end
        idx = torch.arange(step * 8, step * 8 + 8) * 7   # arbitrary dataset ids
        col.push(F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1), idx)
        pushed += idx.tolist()
    assert col.flushes == 2 and col.ptr == 8
    order, stats = col.finish()
    assert order.dtype == np.int64 and sorted(order.tolist()) == sorted(pushed)
    assert [len(g) for g in col.groups] == [16] * 6 + [8]
    for m in ("hardness", "mean_neg_sim", "itc_loss"):   # the walk makes batches harder than random ones
        assert stats[m + "_grouped"] > stats[m + "_random"], m
    assert stats["nn_recall_grouped"] > stats["nn_recall_random"]


def test_neighbour_recall_counts_neighbours_in_the_same_batch():
    # rows 0/1, 2/3, 4/5 are near each other (pairs of nearly equal directions)
    base = torch.eye(3).repeat_interleave(2, dim=0) + 0.01 * torch.arange(6.0)[:, None]
    feats = F.normalize(base, dim=1)
    nbrs = neighbours(feats @ feats.t(), k=1)
    assert neighbour_recall(nbrs, torch.arange(6), batch=2).item() == 1.0   # every nearest neighbour in the batch
    split = torch.tensor([0, 2, 1, 4, 3, 5])                                  # partners sent to other batches
    assert neighbour_recall(nbrs, split, batch=2).item() == 0.0


def test_collector_state_survives_a_weights_only_checkpoint_and_gives_the_same_order():
    def run(interrupt):
        torch.manual_seed(0)
        col = GritCollector(queue_size=32, search_space=16, dim=8, batch_size=8, seed=5, device="cpu")
        col.start_epoch(2)
        for step in range(7):
            if step == 5 and interrupt:
                buf = io.BytesIO()
                torch.save(col.state_dict(), buf)
                col = GritCollector(queue_size=32, search_space=16, dim=8, batch_size=8, seed=5, device="cpu")
                col.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
            col.push(torch.randn(8, 8), torch.randn(8, 8), torch.arange(step * 8, step * 8 + 8))
        return col.finish()[0]

    assert run(False).tolist() == run(True).tolist()


def test_collector_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="search_space"):
        GritCollector(queue_size=50, search_space=16, dim=8, batch_size=8, seed=0, device="cpu")


def test_next_epoch_order_keeps_groups_whole_and_is_a_permutation_across_ranks():
    b, s, world, n = 4, 3, 2, 27   # 24 indices per epoch, 3 dropped by drop_last
    epoch_order = np.random.default_rng(0).permutation(n)[:24]
    rank_orders = [epoch_order[:12][::-1].copy(), epoch_order[12:].copy()]
    rank_orders[1] = rank_orders[1][:-1]   # one unreadable image on rank 1: never grouped
    order = next_epoch_order(rank_orders, epoch_order, b, s, world, seed=0, epoch=0, dataset_len=n)
    assert len(order) == world * s * b and len(set(order.tolist())) == len(order)
    assert set(order.tolist()) <= set(range(n))
    full_groups = [tuple(o[i:i + b]) for o in rank_orders for i in range(0, len(o) - b + 1, b)]
    batches = [tuple(order[i:i + b]) for i in range(0, len(order), b)]
    kept = [grp for grp in full_groups if grp in batches]
    assert len(kept) >= len(full_groups) - 1   # whole mini-batches move; at most one falls off the end
    # mini-batches are redistributed across ranks: rank 0's next slice is not just its own groups
    again = [next_epoch_order(rank_orders, epoch_order, b, s, world, seed=0, epoch=e, dataset_len=n)
             for e in range(1, 6)]
    assert any(set(o[:12].tolist()) != set(rank_orders[0].tolist()) for o in again)


def test_a_replacement_collected_twice_keeps_its_first_place_and_the_bad_index_rotates_back():
    """An unreadable image's sample is replaced by another item, whose index is then collected twice."""
    b, s, world, n = 4, 3, 2, 24
    epoch_order = np.random.default_rng(2).permutation(n)
    rank_orders = [epoch_order[:12].copy(), epoch_order[12:].copy()]
    bad, replacement = rank_orders[1][3], rank_orders[0][5]
    rank_orders[1][3] = replacement   # rank 1 trained the replacement in place of the unreadable item
    order = next_epoch_order(rank_orders, epoch_order, b, s, world, seed=0, epoch=0, dataset_len=n)
    assert sorted(order.tolist()) == list(range(n))   # a permutation: the bad index back, no duplicate
    assert bad in order and list(order).count(replacement) == 1


def test_grouped_sampler_slices_concatenate_to_the_global_order():
    order = np.random.default_rng(1).permutation(40)[:32]
    slices = []
    for rank in range(2):
        smp = GroupedSampler(36, 4, num_replicas=2, rank=rank, seed=0)   # 4 batches per rank
        smp.set_order(1, order)
        smp.set_epoch(1)
        slices.append(list(smp))
        smp.set_epoch(1, start_batch=2)
        assert list(smp) == slices[-1][8:]
        smp.set_epoch(2)   # no order for epoch 2: random, like the plain sampler
        assert len(list(smp)) == 16
    assert slices[0] + slices[1] == order.tolist()
    with pytest.raises(ValueError, match="expected 32"):
        smp.set_order(3, order[:30])


def test_hardness_is_the_mean_hardest_negative_similarity():
    img = torch.eye(4)
    txt = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0.2, 0.8]])
    # the diagonal (each image's own text) never counts as a negative
    sim = img @ txt.t()
    expect = (sim - 4 * torch.eye(4)).max(1).values.mean().item()
    assert float(batch_hardness(img, txt, 4)[0]) == pytest.approx(expect)
    assert torch.isnan(batch_hardness(img, txt, 1)).all()   # a batch of one has no negative
    assert float(batch_hardness(img, txt, 2)[0]) == pytest.approx(((sim[:2, :2] - 4 * torch.eye(2)).max(1).values.sum()
                                                   + (sim[2:, 2:] - 4 * torch.eye(2)).max(1).values.sum()).item() / 4)


def test_batch_hardness_mean_negative_and_itc_loss_by_hand():
    img = torch.eye(4)
    txt = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0.2, 0.8]])
    sim = img @ txt.t()
    hardest, mean_neg, itc = batch_hardness(img, txt, 4, temp=0.5).tolist()
    assert batch_hardness(img, txt, 4, itc=False).tolist() == pytest.approx([hardest, mean_neg])
    assert mean_neg == pytest.approx(((sim.sum(1) - sim.diag()) / 3).mean().item())
    expect = -torch.log_softmax(sim / 0.5, dim=1).diag().mean().item()
    assert itc == pytest.approx(expect)
    # two batches of two: only the 2x2 blocks count
    h2 = batch_hardness(img, txt, 2, temp=0.5)
    blocks = [sim[:2, :2], sim[2:, 2:]]
    assert h2[1].item() == pytest.approx(sum((b.sum() - b.diag().sum()).item() for b in blocks) / 4)
    assert h2[2].item() == pytest.approx(sum(-torch.log_softmax(b / 0.5, 1).diag().sum().item() for b in blocks) / 4)


def test_order_stats_reads_the_grouped_recall_off_the_original_neighbours():
    torch.manual_seed(1)
    img, txt = F.normalize(torch.randn(48, 8), dim=1), F.normalize(torch.randn(48, 8), dim=1)
    sim = img @ txt.t()
    walk = walk_similarities(sim, start=5)
    stats = order_stats(img, txt, sim, walk, batch=8)

    def brute_recall(order):   # recomputed from scratch on the reordered rows
        s = img[order] @ txt[order].t()
        s.fill_diagonal_(-4)
        nn = s.topk(5, dim=1).indices // 8
        return (nn == (torch.arange(48) // 8)[:, None]).float().mean().item()

    w = torch.from_numpy(walk)
    assert stats["nn_recall_random"] == pytest.approx(brute_recall(torch.arange(48)))
    assert stats["nn_recall_grouped"] == pytest.approx(brute_recall(w))
    s = img[w] @ txt[w].t()   # the in-batch image->text ITC at GRIT's 0.07, over the 6 consecutive batches
    itc = sum(-torch.log_softmax(s[b:b + 8, b:b + 8] / 0.07, dim=1).diag().sum().item() for b in range(0, 48, 8)) / 48
    assert stats["itc_loss_grouped"] == pytest.approx(itc, rel=1e-5)
    # 5 pairs have no 5 neighbours besides each image's own text: no recall, rather than one counting itself
    few = order_stats(img[:5], txt[:5], sim[:5, :5], walk_similarities(sim[:5, :5], start=0), batch=2)
    assert np.isnan(few["nn_recall_random"]) and np.isnan(few["nn_recall_grouped"])


def original_walk(img, txt, start, temp=0.07):
    """GRIT's procedure as published (spec grit_mafa.md §1.3.4), written here: softmax probability matrices
    with zeroed diagonals, top-1 per step, visited rows and columns zeroed in both matrices."""
    p_i2t = torch.softmax(img @ txt.t() / temp, dim=1)
    p_t2i = torch.softmax(txt @ img.t() / temp, dim=1)
    p_i2t.fill_diagonal_(0)
    p_t2i.fill_diagonal_(0)
    m, c, out = len(img), start, [start]
    for _ in range((m - 1) // 2):
        t = int(torch.argmax(p_i2t[c]))
        for p in (p_i2t, p_t2i):
            p[c, :] = 0
            p[:, c] = 0
        nxt = int(torch.argmax(p_t2i[t]))
        for p in (p_i2t, p_t2i):
            p[t, :] = 0
            p[:, t] = 0
        out += [t, nxt]
        c = nxt
    if m % 2 == 0:
        out.append(int(torch.argmax(p_i2t[c])))
    return out


def test_the_fp32_collector_emits_the_original_procedures_order_at_grits_sizes():
    """Batch 128, search space 1,920, queue 3,840, features of 256: fed the same shuffles and starts, the
    collector's order is the original's, position for position (with the queue in fp16, 1,164 of 5,120
    places differ: benchmarks/grit_precision.py)."""
    size, space, batch, dim = 3840, 1920, 128, 256
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(64, dim, generator=g)
    img = centres[torch.randint(64, (size,), generator=g)] + 0.7 * torch.randn(size, dim, generator=g)
    img, txt = F.normalize(img, dim=1), F.normalize(img + 0.7 * torch.randn(size, dim, generator=g), dim=1)
    col = GritCollector(size, space, dim, batch, seed=7, device="cpu")
    stream = col._generator()   # the flush's shuffle and starts
    idx = torch.arange(size) * 3
    for s in range(0, size, batch):
        col.push(img[s:s + batch], txt[s:s + batch], idx[s:s + batch])
    order, _ = col.finish()
    perm = torch.randperm(size, generator=stream)
    expected = []
    for s in range(0, size, space):
        start = int(torch.randint(space, (1,), generator=stream))
        walk = original_walk(img[perm][s:s + space], txt[perm][s:s + space], start)
        expected += idx[perm][s:s + space][walk].tolist()
    assert order.tolist() == expected


def test_a_leftover_of_one_pair_is_still_emitted():
    col = GritCollector(queue_size=8, search_space=4, dim=4, batch_size=2, seed=0, device="cpu")
    feats = F.normalize(torch.randn(9, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    col.push(feats, feats, torch.arange(9))   # one full queue, then a single pair at the end of the epoch
    order, _ = col.finish()
    assert sorted(order.tolist()) == list(range(9)) and [len(g) for g in col.groups] == [4, 4, 1]
