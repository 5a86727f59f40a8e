"""Evaluation splits checked at start-up, before any training: an empty split and a model selection with
nothing to select on are known before the first step, not after an epoch."""
from schema import ConfigError, value
from dataset.caption_dataset import as_list


def check_split(config, key, split, count):
    """True when the split ``split`` (read from config key ``key``) has examples. An empty one is an error
    naming the file and the split, or with ``empty_splits: skip`` a warning: the caller then evaluates
    nothing and writes no metric for it (never an accuracy over 0 examples)."""
    if count:
        return True
    what = f"config key {key!r} ({', '.join(as_list(config.get(key) or []))}): the {split} split has no examples"
    if value(config, "empty_splits") == "skip":
        print(f"warning: {what}; skipped (empty_splits: skip), no {split} metric is written")
        return False
    raise ConfigError(f"{what}. Give a file with examples, remove the key, or set empty_splits: skip")


def selection_metric(config, metric, has_val):
    """The metric ``checkpoint_best.pth`` is selected on, or None to test the last epoch
    (``model_selection: last``). Selection without a val split is an error at start-up."""
    if value(config, "model_selection") == "last":
        return None
    if not has_val:
        raise ConfigError(f"model selection ({metric}) needs a val split with examples (config key 'val_file'); "
                          "give one, or set model_selection: last to test the last epoch's weights")
    return metric


def with_texts_cut(metrics, cut, what="texts"):
    """``metrics`` with the count of texts longer than the text encoder's positions (cut to fit), if any."""
    if cut:
        print(f"{cut} {what} were longer than the text encoder's positions (max_position_embeddings) and were cut")
        metrics = {**metrics, "texts_cut": int(cut)}
    return metrics
