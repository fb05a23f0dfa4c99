"""Evaluating a translator: translating text, and BLEU/chrF with sacrebleu.

translations = translate(model, preprocessor, ["Thank you, Chris."])
translation = translate(model, preprocessor, "Thank you, Chris.")  # one
corpus_scores(translations, references)  # {"bleu": ..., "chrf": ...}
"""

from keras import ops

from keras_rnn_lora.translation.decoding import check_positive_int
from keras_rnn_lora.translation.decoding import decode


def translate(
    model,
    preprocessor,
    sentences,
    beam_width=1,
    decoder=None,
    batch_size=64,
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

    Returns:
        A list of strings, one per sentence; for one string, its
        translation as a string.
    """
    check_positive_int("beam_width", beam_width)
    check_positive_int("batch_size", batch_size)
    if isinstance(sentences, (str, bytes)):
        return translate(
            model, preprocessor, [sentences], beam_width, decoder, batch_size
        )[0]
    sentences = list(sentences)
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, (str, bytes)):
            raise TypeError(
                "Received an invalid value for `sentences`, expected a "
                "string or a list of strings. Received: an item of type "
                f"{type(sentence).__name__} at index {index}"
            )
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
