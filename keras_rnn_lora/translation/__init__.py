"""The translation application: an RNN encoder-decoder for IWSLT 2017
English-German, the first user of the LoRA library.

Modules, in the order data flows through them:

    iwslt2017        the official release: reading it, pairing, errors
    iwslt2017_tfds   the same as a tensorflow-datasets builder
    preprocessing    TranslationPreprocessor: text <-> ids, tf.data batches
    model            Translator (encode / decode_step), build_translator
    metrics          masked loss, accuracy, perplexity; compile_translator
    decoding         greedy and beam search over a step function
    evaluation       translate, corpus BLEU and chrF (sacrebleu)
    export           SavedModel for TensorFlow Serving (serving_versions)

Importing this package registers the translator's model class, losses and
metrics with Keras, so a translator saved as `.keras` loads; it needs only
Keras (as do `model`, `metrics`, `decoding`, `evaluation`). The names below
that need TensorFlow load their module on first use.
"""

import importlib

# Registered with Keras on import: a saved translator names them.
from keras_rnn_lora.translation import metrics  # noqa: F401
from keras_rnn_lora.translation import model  # noqa: F401

_LAZY = {
    "IWSLTDataError": "iwslt2017",
    "read_pairs": "iwslt2017",
    "load_iwslt2017": "iwslt2017_tfds",
    "TranslationPreprocessor": "preprocessing",
    "Translator": "model",
    "build_translator": "model",
    "compile_translator": "metrics",
    "MaskedSparseCrossEntropy": "metrics",
    "MaskedPerplexity": "metrics",
    "MaskedAccuracy": "metrics",
    "decode": "decoding",
    "greedy_decode": "decoding",
    "greedy_search": "decoding",
    "beam_search": "decoding",
    "compiled_decoder": "decoding",
    "translate": "evaluation",
    "EmptyTranslationWarning": "evaluation",
    "corpus_scores": "evaluation",
    "score_signatures": "evaluation",
    "export_translator": "export",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(
            f"module 'keras_rnn_lora.translation' has no attribute {name!r}"
        )
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
