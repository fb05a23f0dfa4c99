"""The paper's experiment, fair and incremental: pre-train an RNN
translator on IWSLT 2017 English-German, then let new data arrive in chunks
and learn each one with LoRA on the hidden-state weights alone, against
full fine-tuning.

1. Data: the training split in file order: an initial part, then the new
   data in `--increments` chunks; held-out pairs of each (examples/iwslt/data).
2. Pre-training on the initial part, its learning rate halved on every
   plateau, until early stopping ends it; its best epoch is the base of
   every arm.
3. Learning rates: each method its own, chosen on validation perplexity on
   the first chunk from a grid spanning both directions.
4. The incremental phase, `--seeds` times: every arm learns the chunks in
   turn (LoRA arms merge their adapter after each and start a fresh one;
   the control arm trains like `full` on initial data instead), each
   chunk with the same schedule and early stopping, ending on its best
   validation epoch; after every chunk, perplexity on every held-out part
   (the forgetting matrix).
5. Costs: every arm's training step timed interleaved in one process;
   peak memory per arm in fresh processes, `--memory-samples` per arm.
6. `--ablation`: LoRA ranks, target sets, variants, alpha and dropout, each
   point an arm under the same protocol, in stages (iwslt/ablation.py).
7. Report: results.md (printed last), results.json, curves.png,
   forgetting.png (and ablation.png); one export to `--export-dir` for
   TensorFlow Serving of the pre-trained model and every LoRA arm after
   every chunk, as adapters chosen per request (`<arm>_after_<k>`,
   `base`; the default: the best LoRA arm after the last chunk, among
   those not on a bfloat16 base if any).

Every step runs in a process of its own and is saved as it finishes: start
a killed run again with the same arguments and it resumes.

Time on a 2-core CPU: `--smoke` about ten minutes; the defaults, sized to
about an hour, depend on when early stopping ends each fit; `--ablation`
adds hours (it resumes: run it in pieces). `--preset paper` (hidden 2048)
is sized for a GPU.

    python examples/iwslt_translate.py [--smoke] [--seeds 3] [--ablation]
"""

import os

# Before anything imports TensorFlow (Keras sets its own default): what
# TensorFlow's C++ logs stays out of the console (see iwslt/quiet.py). The
# main job's parts live beside this script, in examples/iwslt/, which Python
# finds because it puts the script's folder on `sys.path`.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from iwslt import ablation  # noqa: E402
from iwslt import costs  # noqa: E402
from iwslt import increments  # noqa: E402
from iwslt import jobs  # noqa: E402
from iwslt import multiworker  # noqa: E402
from iwslt import processes  # noqa: E402
from iwslt import report  # noqa: E402
from iwslt import settings  # noqa: E402
from iwslt.data import DataRefused  # noqa: E402
from iwslt.data import Split  # noqa: E402
from iwslt.data import data_fingerprint  # noqa: E402
from iwslt.quiet import import_backend  # noqa: E402


def main(argv=None):
    # -- Setup: one run per output folder, keyed on settings and data.
    parser, args = settings.parse(argv)
    import_backend()  # reading the data imports the library, and Keras
    multiworker.check(parser, args)
    # -- Data: read and checked against the settings before anything is
    # written, so a refused run leaves no trace in --output-dir.
    try:
        split = Split(args)
        fingerprint = data_fingerprint(args)
    except DataRefused as error:
        parser.error(str(error))
    os.makedirs(args.output_dir, exist_ok=True)
    with processes.run_lock(args.output_dir):
        run(parser, args, split, fingerprint)


def run(parser, args, split, fingerprint):
    key = settings.run_key(args, fingerprint)
    key_path = os.path.join(args.output_dir, "run_key.txt")
    if os.path.exists(key_path) and open(key_path).read() != key:
        parser.error(
            f"--output-dir {args.output_dir} holds a run with other settings, "
            "other data or other code; choose another folder or delete it"
        )
    with open(key_path, "w") as file:
        file.write(key)
    print(f"Data: {split.sizes()}", flush=True)
    arms = args.arms
    learning = [arm for arm in arms if arm != "frozen"]
    processes.run_in_child(jobs.environment, args)
    # -- Train: pre-training, learning rates, the incremental phase.
    if not os.path.exists(jobs.path(args, "pretrain.json")):  # written last
        processes.run_in_child(jobs.pretrain, args)
    methods = sorted({settings.ARMS[arm]["method"] for arm in learning})
    for method in methods:
        processes.run_in_child(jobs.select_learning_rate, args, method)
    for seed in range(args.seeds):
        for arm in arms:
            processes.run_in_child(jobs.run_arm, args, arm, seed)
    # -- The ablation: its points in stages, each an arm of its own, with
    # `full` and `control` over as many seeds.
    points = []
    while args.ablation:
        points = ablation.points(args)
        todo = [p for p in points if ablation.validation(args, p) is None]
        if not todo:
            break
        wanted = {"full", "control", *(ablation.arm_of(args, p) for p in todo)}
        for method in sorted({settings.arm_spec(a)["method"] for a in wanted}):
            processes.run_in_child(jobs.select_learning_rate, args, method)
        for seed in range(ablation.seeds(args)):
            for arm in sorted(wanted):
                processes.run_in_child(jobs.run_arm, args, arm, seed)
        if todo == [p for p in points if ablation.validation(args, p) is None]:
            raise RuntimeError(f"ablation points {todo} did not finish")
    # -- Costs.
    for sample in range(args.memory_samples):
        for arm in learning:  # taking turns, as the step timing does
            processes.run_in_child(costs.memory_probe, args, arm, sample)
    if learning:
        processes.run_in_child(costs.step_timing, args, learning)
    if points:  # timed apart: the arms' figures stay as they were
        timed = ["full", *(ablation.arm_of(args, p) for p in points)]
        processes.run_in_child(costs.step_timing, args, timed, "ablation")
    # -- Evaluate and export.
    results = report.collect(args, split.sizes())
    results["data_fingerprint"] = fingerprint
    # The LoRA arms whose seed 0 (the one served) learned every chunk.
    lora_arms = [
        a
        for a in learning
        if "targets" in settings.ARMS[a]
        and "diverged_at_chunk" not in results["arms"][a]["seeds"][0]
    ]
    if lora_arms:
        # The default adapter: the best arm whose served model is the one it
        # evaluated (a bfloat16 base is served in float32), if any.
        exact = [a for a in lora_arms if "base_dtype" not in settings.ARMS[a]]
        best = min(
            exact or lora_arms,
            key=lambda a: results["arms"][a]["val_perplexity"]["mean"],
        )
        processes.run_in_child(increments.export, args, lora_arms, best)
        results["export"] = report.read_json(jobs.path(args, "export.json"))
    jobs.clean(args)
    print("\n" + report.write(results, args.output_dir))


if __name__ == "__main__":
    main()
