"""What is measured of a model: perplexity on every part of the data (the
forgetting matrix's rows), test perplexity, BLEU and chrF, and the
translations of a fixed handful of sentences.

Perplexity excludes padding and is never label-smoothed. BLEU and chrF are
sacrebleu's corpus scores of greedy translations against the references.
"""

import warnings

from iwslt.data import batches
from iwslt.settings import SENTENCES

DECODE_BATCH = 256  # sentences decoded at once: few, wide matmuls on a CPU


def perplexity(args, model, preprocessor, pairs):
    results = model.evaluate(
        batches(args, preprocessor, pairs, shuffle=False),
        verbose=0,
        return_dict=True,
    )
    return float(results["perplexity"])


def forgetting_row(args, model, preprocessor, split):
    """Perplexity on the held-out pairs of the initial part and of every
    chunk, and on validation: one row of the forgetting matrix."""
    row = {
        part: perplexity(args, model, preprocessor, pairs)
        for part, pairs in split.heldout.items()
    }
    row["validation"] = perplexity(args, model, preprocessor, split.validation)
    return row


def translations(args, model, preprocessor, sources, decoder=None):
    from keras_rnn_lora.translation import decoding
    from keras_rnn_lora.translation import evaluation

    decoder = decoder or decoding.compiled_decoder(
        model, 1, preprocessor.max_length
    )
    with warnings.catch_warnings():
        # A briefly trained arm's empty translations are reported as they
        # are, in results.md; the console stays for progress.
        warnings.simplefilter("ignore", evaluation.EmptyTranslationWarning)
        return evaluation.translate(
            model,
            preprocessor,
            sources,
            decoder=decoder,
            batch_size=DECODE_BATCH,
        )


def bleu(args, model, preprocessor, pairs, decoder=None):
    from keras_rnn_lora.translation import evaluation

    hypotheses = translations(
        args, model, preprocessor, [p[0] for p in pairs], decoder
    )
    return evaluation.corpus_scores(hypotheses, [p[1] for p in pairs])


def final_scores(args, model, preprocessor, split):
    """Test perplexity, BLEU and chrF (tst2010-2015), BLEU on the held-out
    initial pairs (forgetting as NMT reports it), and the fixed sentences."""
    from keras_rnn_lora.translation import decoding

    decoder = decoding.compiled_decoder(model, 1, preprocessor.max_length)
    test = bleu(args, model, preprocessor, split.test, decoder)
    initial = bleu(args, model, preprocessor, split.heldout["initial"], decoder)
    return {
        "test_perplexity": perplexity(args, model, preprocessor, split.test),
        "test_bleu": test["bleu"],
        "test_chrf": test["chrf"],
        "heldout_initial_bleu": initial["bleu"],
        "sentences": dict(
            zip(
                SENTENCES,
                translations(args, model, preprocessor, SENTENCES, decoder),
                strict=True,
            )
        ),
    }
