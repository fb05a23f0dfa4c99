"""Evaluating a translator: translating text, and BLEU/chrF with sacrebleu.

translations = translate(model, preprocessor, ["Thank you, Chris."])
translation = translate(model, preprocessor, "Thank you, Chris.")  # one
corpus_scores(translations, references)  # {"bleu": ..., "chrf": ...}
"""

import warnings

from keras import ops

from keras_rnn_lora import routing
from keras_rnn_lora.checks import check_positive_int
from keras_rnn_lora.translation.decoding import decode


def translate(
    model,
    preprocessor,
    sentences,
    beam_width=1,
    decoder=None,
    batch_size=64,
    adapters=None,
):
    """Translates sentences: greedy, or beam search when `beam_width > 1`,
    `batch_size` sentences at a time.

    Args:
        model: a `Translator`.
        preprocessor: its `TranslationPreprocessor` (text <-> ids and
            `max_length`).
        sentences: a list of source strings, or one string (one sentence,
            never a sequence of characters).
        beam_width: hypotheses kept per sentence; 1 (default) is greedy.
        decoder: optional `compiled_decoder(model, beam_width,
            preprocessor.max_length)` to reuse across calls (much faster for
            many batches).
        batch_size: sentences decoded at once, a positive integer.
        adapters: for a model with named adapters, the adapter of each
            sentence (a list as long as `sentences`) or of all of them (one
            name); `None` or `"base"` for the base model (see
            `keras_rnn_lora.call_with_adapters`). Greedy decoding only.

    Returns:
        A list of strings, one per sentence; for one string, its
        translation as a string. A briefly trained translator often ends
        every sentence at once (its most likely first token is `[END]`) and
        returns empty strings: when every translation of non-empty input is
        empty, an `EmptyTranslationWarning` says so.
    """
    check_positive_int("beam_width", beam_width)
    check_positive_int("batch_size", batch_size)
    one = isinstance(sentences, (str, bytes))
    sentences = [sentences] if one else list(sentences)
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, (str, bytes)):
            raise TypeError(
                "Received an invalid value for `sentences`, expected a "
                "string or a list of strings. Received: an item of type "
                f"{type(sentence).__name__} at index {index}"
            )
    routes = _routes(model, adapters, len(sentences), beam_width, decoder)
    translations = []
    for start in range(0, len(sentences), batch_size):
        batch = preprocessor.source_batch(sentences[start : start + batch_size])
        if routes is not None:
            names, ids = routes
            with routing.routed(names, ids[start : start + batch_size]):
                tokens, _ = decode(model, batch, 1, preprocessor.max_length)
        elif decoder is None:
            tokens, _ = decode(
                model, batch, beam_width, preprocessor.max_length
            )
        else:
            tokens, _ = decoder(batch)
        translations += preprocessor.target_texts(ops.convert_to_numpy(tokens))
    if _has_text(sentences) and not _has_text(translations):
        warnings.warn(
            f"Every one of the {len(sentences)} translation(s) is empty: the "
            "model ends each sentence at once ([END] is its most likely "
            "first token), as a briefly trained translator does. Train "
            "longer; perplexity still tells what it learned.",
            EmptyTranslationWarning,
            stacklevel=2,
        )
    return translations[0] if one else translations


def _routes(model, adapters, count, beam_width, decoder):
    """`(names, ids)` for per-sentence adapters, or `None`."""
    if adapters is None:
        return None
    from keras_rnn_lora.named_adapters import adapter_ids
    from keras_rnn_lora.named_adapters import list_adapters

    if beam_width != 1 or decoder is not None:
        raise ValueError(
            f"Received `adapters` with beam_width={beam_width} and a "
            "decoder: per-sentence adapters decode greedily, without a "
            "compiled decoder (beam_width=1, decoder=None)."
        )
    if isinstance(adapters, str):
        adapters = [adapters] * count
    adapters = list(adapters)
    if len(adapters) != count:
        raise ValueError(
            f"Received {len(adapters)} `adapters` for {count} sentences: "
            "one per sentence, or one name for all."
        )
    return list_adapters(model), adapter_ids(model, adapters)


def _has_text(texts):
    return any(
        (t.decode(errors="replace") if isinstance(t, bytes) else t).strip()
        for t in texts
    )


class EmptyTranslationWarning(UserWarning):
    """Every translation of a call to `translate` came back empty."""


def corpus_scores(hypotheses, references):
    """Corpus BLEU (sacrebleu's default 13a tokenization) and chrF of
    detokenized hypotheses against one reference each.

    Returns:
        `{"bleu": float, "chrf": float}`, both on sacrebleu's 0-100 scale.
    """
    import sacrebleu

    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(
            f"Received {len(hypotheses)} `hypotheses` but "
            f"{len(references)} `references`: they must pair up."
        )
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def score_signatures():
    """sacrebleu's signatures of the BLEU and chrF that `corpus_scores`
    computes (one reference per sentence): `{"bleu": str, "chrf": str}`,
    such as `"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"`.
    Report them beside the scores: BLEU is comparable only under one
    signature."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.metrics import CHRF

    found = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        metric.corpus_score(["a"], [["a"]])  # sets the reference count
        found[name] = str(metric.get_signature())
    return found
