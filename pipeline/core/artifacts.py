"""The name of every file and folder the pipeline writes: one place, so no literal is spelled twice.

Stage outputs (inside `work/COMP/STAGE/`), the bookkeeping around them (manifests, the run cache,
temporary names) and the files under `submissions/COMP/`. A stage declares its outputs (`outs=`)
with these names, and the runner and `kp status` check them.
"""
from __future__ import annotations

# bookkeeping of the cache (pipeline.core.cache, pipeline.core.runs)
MANIFEST = "manifest.json"          # beside every stage output: fingerprint, inputs, metrics
ENTRY_FILE = ".entry.json"          # the last file written into a run-cache entry: it is complete
LAST_FILE = "last.json"             # _runs/STAGE/last.json: how the current result got there
RUNS_FOLDER = "_runs"               # work/COMP/_runs/: every stored result, by fingerprint
CACHE_FOLDER = "_cache"             # work/COMP/_cache/: downloads that survive everything but clean
SWEEPS_FOLDER = "sweeps"            # work/COMP/sweeps/NAME/: a sweep's sweep.json and trials.jsonl (kp sweep)
SWEEP_FILE = "sweep.json"           # what a sweep was asked: base config, grid, objective
TRIALS_FILE = "trials.jsonl"        # one line per finished trial: overrides, command, score, fingerprint
SWEEP_PLOT = "sweep.png"            # the score against each setting a sweep varied (kp runs --sweep NAME --plot)
STUDY_FILE = "study.db"             # a search's Optuna study (SQLite), so --trials can be raised later
CURVES_FOLDER = "_tensorboard"      # work/COMP/_tensorboard/STORE/KEY/: each training's TensorBoard event files
VARIANTS_FOLDER = "_variants"       # work/COMP/_variants/NAME/: a blend source's stage links (its _runs, _cache: COMP's)
LOCK_FILE = ".lock"                 # one kp run per competition at a time
LAST_RUN_FILE = "last-run.json"     # work/COMP/: the settings the last kp run there ran with
WORK_MARKER = ".kp-work"            # in every competition work folder kp created: kp deletes nothing unmarked
TMP_PREFIX = ".tmp-"                # a folder or file being written; swept after a crash (if named by kp)
OLD_PREFIX = ".old-"                # a replaced entry during its swap; put back or swept after a crash
TEMPORARY_MARK = ".kp-"             # .tmp-NAME.kp-XXXXXXXX: a temporary name kp made (8 hex digits); no other is swept
ERROR_LOG = "{stage}.error.log"     # work/COMP/STAGE.error.log: the traceback of a failed stage

# download
RAW_DIR = "raw"                     # the extracted competition files
INDEX_FILE = "index.csv"            # subset, id, path, row, label, group
REPORT_FILE = "report.json"         # counts and bad items (download), sizes per side (split)
SOLUTION_FILE = "solution.csv"      # hidden test labels: only scoring servers and benchmarks read it

# split
SPLIT_FILE = "split.csv"            # id, fold, side (train | valid), aligned with the index's train rows

# precompute: one array and one rows table per subset (train, test)
META_FILE = "meta.json"


def array_file(subset: str) -> str:
    """`train.npy` / `test.npy`: cached features (or pixels), row for row with `rows_file(subset)`."""
    return f"{subset}.npy"


def rows_file(subset: str) -> str:
    """`train_rows.csv` / `test_rows.csv`: the id (and label) of each row of `array_file(subset)`."""
    return f"{subset}_rows.csv"


SHARD_FILE = "shard.npy"            # precompute on Ray: one shard unit's feature rows, stitched into array_file(subset)

# augment: K passes over the training images, T over the test images, each aligned with rows_file(subset)
PASSES_DIR = "passes"               # work/COMP/augment/passes/: every pass of the current run
PREVIEW_PLOT = "preview.png"        # training images beside their augmented versions


def pass_file(subset: str, number: int) -> str:
    """`passes/train_3.npy`: the third augmented pass over the training images (numbered from 1)."""
    return f"{PASSES_DIR}/{subset}_{number}.npy"


# predictions (finetune, ensemble, members): valid and test probabilities with their row ids
def probs_file(side: str) -> str:
    """`valid_probs.npy` / `test_probs.npy`."""
    return f"{side}_probs.npy"


PREDICTION_FILES = (probs_file("valid"), rows_file("valid"), probs_file("test"), rows_file("test"))
BLENDER_FILE = "blender.json"  # blend: what it chose on all rows (weights, or the stacked model), applied to the test rows
FOLD_TEST_FILE = "fold_test_probs.npy"  # cv, and what smooths or students it: each fold model's test probabilities

# training
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
LOSS_PLOT = "loss.png"
CONFUSION_PLOT = "confusion.png"
UNIT_FILE = "unit.json"             # a stored unit's record (a member's, a fold's, a pass's metrics)
MEMBER_HEAD_DIR = "head"            # a model trained in steps: the previous step's model (bnretrain's finetune head)
MEMBERS_PLOT = "members.png"
TOP_LOSSES_PLOT = "top_losses.png"  # every predicting stage: the validation rows with the highest loss

# a training run that survives being killed (pipeline.training.epochs), e.g. work/COMP/_cache/tune-model-backup/KEY/
BACKUP_FOLDER = "{stage}-backup"    # in CACHE_FOLDER: one folder per fingerprint, removed once the stage succeeds
BACKUP_METADATA = "training_metadata.json"  # Keras' BackupAndRestore: the epoch the backup holds
BACKUP_JOURNAL = "journal.json"     # every finished epoch's logs


def best_weights_file(epoch) -> str:
    """`best-7.weights.h5`: the weights of the best epoch so far (0-based), kept beside the backup."""
    return f"best-{epoch}.weights.h5"

# looking at the data and the model (kp show, kp lr-find, kp report): no stage reads these
SHOW_DIR = "show"                   # work/COMP/show/: kp show's grids
SHOW_PLOT = "train.png"             # ... of training images; SHOW_AUGMENTED_PLOT beside their augmented passes
SHOW_AUGMENTED_PLOT = "train_augmented.png"
LR_FIND_DIR = "lr_find"             # work/COMP/lr_find/STAGE/: kp lr-find's plot, record and overlay
LR_FIND_PLOT = "lr_find.png"
LR_FIND_RECORD = "lr_find.json"
LR_FIND_OVERLAY = "overlay.yaml"
HTML_REPORT_FILE = "report.html"    # work/COMP/report.html: kp report

# kp package: work/COMP/package/, an inference bundle for a code competition's kernel
PACKAGE_DIR = "package"
BUNDLE_DIR = "bundle"               # package/bundle/: the bundle, the one entry of the package folder's run store
BUNDLE_FILE = "bundle.json"         # what the bundle holds: the source, fingerprints, settings, models
BUNDLE_MODELS_DIR = "models"        # models/00/model.keras, ...: every model the source averages
BUNDLE_NETWORK_DIR = "network"      # precompute's weights file, when it has one
KERNEL_SCRIPT = "kernel.py"         # the kernel: features of the test images, the models, submission.csv
BUNDLE_WHEELS_DIR = "wheels"        # kp package --wheels: the project's wheel and its dependencies', for pip offline
KERNEL_LOG = "kernel.log"           # the local server's kernel sandbox: a run's stdout and stderr
# kp kernel push: beside the bundle in work/COMP/package/
KERNEL_DIR = "kernel"               # what is pushed as the kernel: kernel.py (or KERNEL_NOTEBOOK), kernel-metadata.json
KERNEL_NOTEBOOK = "kernel.ipynb"    # kernel.kind notebook: kernel.py's code as one notebook cell
KERNEL_OUTPUT_DIR = "output"        # the pushed kernel's output files and log, downloaded when its run ends
PUSH_RECORD = "push.json"           # the pushed kernel: its version, the source fingerprint it runs, how it ended

# submit
SUBMISSION_FILE = "submission.csv"  # in work/COMP/submit/; the copy in submissions/COMP/ is NAME.csv[.gz]
SUBMISSION_META = "submission.json"  # what wrote it and its validation scores; copied as NAME.json
LEDGER_FILE = "ledger.csv"          # submissions/COMP/ledger.csv: validation vs leaderboard per upload
LEDGER_PLOT = "ledger.png"

MAX_NAME_BYTES = 255  # the longest file name Linux filesystems take


def file_name_problem(name: str, room: int = 0) -> str | None:
    """Why `name` cannot be one file's name (None when it can): empty, a path (`/` or `\\`), `.` or `..`,
    a control character (NUL, a newline), or longer than `MAX_NAME_BYTES` less `room` (an extension
    added later)."""
    if not isinstance(name, str) or not name.strip():
        return "an empty name"
    if any(c in name for c in "/\\") or name in (".", ".."):
        return "a path, not a plain file name"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds a control character (NUL, newline...)"
    if len(name.encode()) > MAX_NAME_BYTES - room:
        return f"longer than {MAX_NAME_BYTES - room} bytes"
    return None
