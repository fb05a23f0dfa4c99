"""0.1.0's import path of the translator, kept so code written against it
still runs; new code imports `keras_rnn_lora.translation`. The functions
below keep their 0.1.0 signatures."""

from keras_rnn_lora.translation.decoding import compiled_decoder  # noqa: F401
from keras_rnn_lora.translation.decoding import decode
from keras_rnn_lora.translation.decoding import greedy_decode  # noqa: F401
from keras_rnn_lora.translation.evaluation import corpus_scores  # noqa: F401
from keras_rnn_lora.translation.metrics import MaskedAccuracy  # noqa: F401
from keras_rnn_lora.translation.metrics import MaskedPerplexity  # noqa: F401
from keras_rnn_lora.translation.metrics import MaskedSparseCrossEntropy  # noqa: F401
from keras_rnn_lora.translation.metrics import compile_translator  # noqa: F401
from keras_rnn_lora.translation.model import build_translator  # noqa: F401
from keras_rnn_lora.translation.tokens import END_ID  # noqa: F401
from keras_rnn_lora.translation.tokens import PAD_ID  # noqa: F401
from keras_rnn_lora.translation.tokens import START_ID  # noqa: F401


def beam_search(model, encoder_tokens, beam_width=4, max_length=64):
    """`translation.decoding.decode` with 0.1.0's argument order."""
    return decode(model, encoder_tokens, beam_width, max_length)


def translate(
    model,
    sentences,
    src_tokenizer,
    tgt_tokenizer,
    max_length=64,
    beam_width=1,
    decoder=None,
):
    """`translation.evaluation.translate` with keras-hub tokenizers."""
    from keras_rnn_lora.translation.evaluation import translate as run
    from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor

    preprocessor = TranslationPreprocessor(
        src_tokenizer.proto, tgt_tokenizer.proto, max_length
    )
    return run(model, preprocessor, sentences, beam_width, decoder)
