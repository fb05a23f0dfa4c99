"""The parts of the main job, `examples/iwslt_translate.py`:

settings   defaults, presets, arms, learning-rate grids, arguments
data       the split in file order, tokenizers, batches
arms       building an arm, learning one chunk (resumable, best epoch)
evaluate   perplexity, forgetting rows, BLEU/chrF, fixed sentences
jobs       pre-training, learning-rate choice, the incremental phase
costs      peak memory per arm, interleaved step timing
ablation   LoRA ranks and targets against trainable parameters
report     results.json, results.md and the plots
quiet      importing the backend without TensorFlow's start-up lines
"""
