"""0.1.0's import path of the TF Serving export, kept so code written
against it still runs; new code uses
`keras_rnn_lora.translation.export.export_translator(model, preprocessor,
export_dir)`. The function below keeps its 0.1.0 signature."""

from keras_rnn_lora.translation.export import TF_TEXT_OPS  # noqa: F401
from keras_rnn_lora.translation.export import WARMUP_SENTENCES  # noqa: F401


def export_translator(
    model, src_tokenizer, tgt_tokenizer, export_dir, *, max_length=64, **kwargs
):
    """`translation.export.export_translator` with keras-hub tokenizers."""
    from keras_rnn_lora.translation import export
    from keras_rnn_lora.translation.preprocessing import TranslationPreprocessor

    preprocessor = TranslationPreprocessor(
        src_tokenizer.proto, tgt_tokenizer.proto, max_length
    )
    return export.export_translator(model, preprocessor, export_dir, **kwargs)
