"""Evaluating a translator: translating text, and BLEU/chrF with sacrebleu.

translations = translate(model, preprocessor, ["Thank you, Chris."])
corpus_scores(translations, references)  # {"bleu": ..., "chrf": ...}
"""

from keras import ops

from keras_rnn_lora.translation.decoding import decode


def translate(
    model,
    preprocessor,
    sentences,
    beam_width=1,
    decoder=None,
    batch_size=64,
):
    """Translates a list of strings: greedy, or beam search when
    `beam_width > 1`, `batch_size` sentences at a time.

    Args:
        model: a `Translator`.
        preprocessor: its `TranslationPreprocessor` (text <-> ids and
            `max_length`).
        sentences: a list of source strings.
        decoder: optional `compiled_decoder(model, beam_width,
            preprocessor.max_length)` to reuse across calls (much faster for
            many batches).

    Returns:
        A list of strings, one per sentence.
    """
    sentences = list(sentences)
    translations = []
    for start in range(0, len(sentences), batch_size):
        batch = preprocessor.source_batch(sentences[start : start + batch_size])
        if decoder is None:
            tokens, _ = decode(
                model, batch, beam_width, preprocessor.max_length
            )
        else:
            tokens, _ = decoder(batch)
        translations += preprocessor.target_texts(ops.convert_to_numpy(tokens))
    return translations


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
