"""Configuration: `configs/defaults.yaml`, then `configs/COMP.yaml`, then `--config` files, then `--set`.

Each layer is deep-merged over the one before (mappings merge, everything else is replaced) and
every leaf remembers which layer set it, so that a validation error can name the file (or the
`--set` argument) at fault. The merged tree is validated by pydantic models that forbid unknown
keys: the top-level sections below plus one section per stage, declared by the stage itself.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator

from pipeline.core.artifacts import VARIANTS_FOLDER
from pipeline.core.cache import STAMP_MODES
from pipeline.core.competition import Competition, network_size
from pipeline.core.errors import PipelineError
from pipeline.core.executor import Compute
from pipeline.core.readers import read_text
from pipeline.core.settings import StrictModel
from pipeline.kaggle.api import Network
from pipeline.models.backbones import CUTS, PREPROCESSING
from pipeline.models.build import Model
from pipeline.training.settings import Training

DEFAULTS_FILE = "defaults.yaml"
COMPETITION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # never a path: it names folders that kp deletes


class Paths(StrictModel):
    """The `paths` section: where the pipeline writes, relative to the project root unless absolute."""

    work: str = Field("work", description="stage outputs go to WORK/COMP/STAGE/ (relative to the project root)")
    submissions: str = Field("submissions", description="submission files and ledger.csv go to SUBMISSIONS/COMP/")


class Cache(StrictModel):
    """The `cache` section: how the cache notices a changed input file, and whether a second run waits for
    the competition's lock; in no fingerprint.

    It stamps input files outside the config (source archives, weights files); the stamp is in the
    fingerprint, this choice is not."""

    stamp: Literal[STAMP_MODES] = Field("mtime", description=(
        "mtime: size + modification time (cheap) | content: sha256 (a copied file is the same; a same-size edit "
        "is not)"))
    wait: bool = Field(False, description=(
        "when another kp run holds the competition's lock: wait for it (--wait) | false: stop at once, naming it"))


class Kaggle(StrictModel):
    """The `kaggle` section: talking to Kaggle's API (download, upload, polling); in no fingerprint."""

    connect_timeout_s: float = Field(Network.connect_timeout_s, gt=0, description=(
        "seconds to wait for a connection to Kaggle's API"))
    read_timeout_s: float = Field(Network.read_timeout_s, gt=0, description=(
        "seconds to wait for each answer (and each piece of a download) before trying again"))
    retries: int = Field(Network.retries, ge=0, description=(
        "tries after the first, with backoff; an upload is tried again only if the connection was never made"))
    backoff_s: float = Field(Network.backoff_s, ge=0, description="the wait before the second retry, doubling after it")

    poll_timeout_s: float = Field(300, ge=0, description=(
        "how long to wait for the public score; after that the row stays pending"))
    poll_every_s: float = Field(5, gt=0, description="seconds between two looks at the submission's status")


class Kernel(StrictModel):
    """The `kernel` section: a code competition's kernel (kp kernel push, kp submit --upload); in no fingerprint."""

    dataset: str = Field("{comp}-kp-models", pattern=r"^[a-z0-9{}][a-z0-9{}-]*$", description=(
        "the Kaggle dataset the bundle is pushed to, under your user ({comp}: the competition's name)"))
    slug: str = Field("{comp}-kp-inference", pattern=r"^[a-z0-9{}][a-z0-9{}-]*$", description=(
        "the kernel's slug and title, under your user ({comp}: the competition's name)"))
    wheels: str | None = Field("3.11", description=(
        "bundle the wheels that install kp offline for this CPython version (Kaggle's image: 3.11) | null: none, "
        "for an image that has kp"))
    kind: Literal["script", "notebook"] = Field("script", description=(
        "push the kernel as a Python script | as a notebook of one cell (for a competition that takes only notebooks)"))
    enable_gpu: bool = Field(False, description="run the kernel on a GPU (the kernel never has internet access)")
    time_limit_s: float = Field(32400, gt=0, description=(
        "Kaggle's limit on the kernel's run (9 hours; some competitions allow 90 minutes on CPU only): kp kernel push "
        "refuses a bundle whose estimated time is over it"))
    hidden_rows: int | None = Field(None, ge=1, description=(
        "test images the hidden rerun holds, for the time estimate (null: as many as the public test)"))
    timing_rows: int = Field(3000, ge=1, description=(
        "public test images kp package times the kernel on (all of them: its probabilities are also checked "
        "against the source's)"))
    poll_timeout_s: float = Field(3600, ge=0, description=(
        "how long kp kernel push waits for the kernel's run (and kp submit --upload for a code submission's)"))
    poll_every_s: float = Field(30, gt=0, description="seconds between two looks at the kernel's status")

    def names(self, comp: str) -> tuple[str, str]:
        """(the dataset's slug, the kernel's slug) for competition `comp`; Kaggle wants 6 to 50 characters."""
        dataset, kernel = self.dataset.format(comp=comp), self.slug.format(comp=comp)
        for key, name in (("kernel.dataset", dataset), ("kernel.slug", kernel)):
            if not 6 <= len(name) <= 50:
                raise PipelineError(f"{key} gives {name!r}: Kaggle wants a slug of 6 to 50 characters")
        return dataset, kernel


class Sweep(StrictModel):
    """The `sweep` section: how far one `kp sweep` may go; in no fingerprint."""

    max_trials: int = Field(1000, ge=1, description=(
        "the most trials one kp sweep runs: a larger --grid is refused at once, naming its count; a larger "
        "--trials too (raise it if you mean it)"))


class FeatureSet(StrictModel):
    """One entry of the `features` section: a network's features, as changes to `precompute` (unset: precompute's)."""

    backbone: str | None = Field(None, description="as precompute.backbone")
    weights: str | None = Field(None, description="as precompute.weights")
    alpha: float | None = Field(None, gt=0, le=1.0, description="as precompute.alpha")
    preprocess: Literal[PREPROCESSING] | None = Field(None, description="as precompute.preprocess")
    cut: Literal[CUTS] | None = Field(None, description="as precompute.cut")
    image_size: list[int] | None = Field(None, description="as precompute.image_size")

    _height_width = field_validator("image_size")(network_size)

    def overrides(self) -> dict[str, Any]:
        """{`precompute.KEY`: value} for each key this feature set sets."""
        return {f"precompute.{key}": value for key, value in self.model_dump(mode="json", exclude_none=True).items()}


@dataclass
class ResolvedConfig:
    """The validated configuration of one competition, with where each value came from.

    Data only: it runs nothing and writes nothing. A variant (`variant_of`) is the same competition under
    a few changed settings, whose stage links live in `work/COMP/_variants/NAME/` and whose run store is
    the competition's.
    """

    comp: str
    root: Path
    model: Any  # the pydantic Config instance
    values: dict[str, Any]  # model.model_dump(mode="json"): plain values, used for fingerprints
    provenance: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    variant: str = ""

    def get(self, dotted: str) -> Any:
        """The plain value at a dotted key (`split.fraction`), or a whole section (`split`)."""
        node: Any = self.values
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(dotted)
            node = node[part]
        return node

    def section(self, name: str) -> Any:
        return getattr(self.model, name)

    @property
    def competition(self) -> Competition:
        return self.model.competition

    @property
    def compute(self):
        """The `compute` section: where and how units run (`pipeline.core.executor.Compute`)."""
        return self.model.compute

    @property
    def kaggle(self):
        """The `kaggle` section: timeouts and retries of every call to Kaggle's API."""
        return self.model.kaggle

    @property
    def stage_names(self) -> list[str]:
        """The listed stages in the order they run: each after the stages it needs, and a stage whose models
        follow another's recipe (an ensemble of finetune's heads) after that one when it is listed, so
        that every listing and comparison reads as the pipeline goes (`stages:` says which run)."""
        from pipeline.engine.registry import all_stages, in_run_order

        stages = all_stages()

        def after(name: str) -> tuple[str, ...]:
            predicts = stages[name].predicts
            recipe = predicts.recipe(self) if predicts is not None and predicts.recipe is not None else name
            return (*stages[name].needs_for(self), *((recipe,) if recipe != name else ()))

        return in_run_order(self.model.stages, after)

    def path(self, value: str | os.PathLike) -> Path:
        """A configured path, resolved against the project root when relative."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def work_dir(self) -> Path:
        """`work/COMP/`, or a variant's `work/COMP/_variants/NAME/`."""
        competition_dir = self.path(self.model.paths.work) / self.comp
        return competition_dir / VARIANTS_FOLDER / self.variant if self.variant else competition_dir

    @property
    def label(self) -> str:
        """How log lines name it: `COMP`, or `COMP/VARIANT`."""
        return f"{self.comp}/{self.variant}" if self.variant else self.comp

    def variant_of(self, name: str, overrides: dict[str, Any], target: str, where: str) -> "ResolvedConfig":
        """This config with `overrides` applied, listing only `target` and the stages it needs: a blend's source.

        Args:
            name: the variant's folder name (`work/COMP/_variants/NAME/`; the runner makes it).
            overrides: dotted key -> value, applied as `--set` would.
            target: the stage the variant is run for.
            where: what set the overrides, for errors (`blend.sources[1]`).

        Returns:
            The variant's validated config.
        """
        from pipeline.engine.registry import all_stages, with_needs

        values, provenance = copy.deepcopy(self.values), dict(self.provenance)
        for key, value in overrides.items():
            if key.split(".")[0].strip() == "paths":
                raise PipelineError(f"{where}: {key!r}: a variant lives in the competition's work folder and writes "
                                    "where it does; paths.* may not change for one variant")
            _set_dotted(values, key, value, where, provenance)
        values["stages"] = [target]
        model = _validate(values, provenance, f"{self.comp}/{name}", shallow=True)
        resolved = ResolvedConfig(self.comp, self.root, model, model.model_dump(mode="json"), provenance,
                                  self.files, variant=name)
        stages = all_stages()
        wanted = with_needs([target], lambda stage: stages[stage].needs_for(resolved))
        resolved.model = model.model_copy(update={"stages": wanted})
        resolved.values["stages"] = wanted
        _check_predictions_read(resolved, where)
        return resolved

    @property
    def submissions_dir(self) -> Path:
        return self.path(self.model.paths.submissions) / self.comp

    def predicts(self, stage: str):
        """Stage `stage`'s role as a predicting stage (`pipeline.core.stage.Predicts`), or None."""
        from pipeline.engine.registry import all_stages

        return all_stages()[stage].predicts


def project_root() -> Path:
    """The folder holding `configs/`: $KP_ROOT, else the nearest parent of the working directory that
    has `configs/defaults.yaml`.

    Raises:
        PipelineError: neither: kp never falls back to another project (the checkout it was installed
            from) without a word; the message names where it looked and the checkout to `cd` to.
    """
    if os.environ.get("KP_ROOT"):
        root = Path(os.environ["KP_ROOT"]).resolve()
        if not (root / "configs" / DEFAULTS_FILE).is_file():
            raise PipelineError(f"KP_ROOT={root}: no configs/{DEFAULTS_FILE} there; point it at a kp project")
        return root
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "configs" / DEFAULTS_FILE).is_file():
            return candidate
    installed = Path(__file__).resolve().parents[2]
    hint = (f" (kp is installed from {installed}: cd there)" if (installed / "configs" / DEFAULTS_FILE).is_file()
            else "")
    raise PipelineError(f"no configs/{DEFAULTS_FILE} in {here} or any folder above it: run kp inside a project "
                        f"folder{hint}, or set KP_ROOT to one")


def known_competitions(root: Path) -> list[str]:
    configs = root / "configs"
    return sorted(p.stem for p in configs.glob("*.yaml") if p.name != DEFAULTS_FILE)


def load_config(
    comp: str,
    root: Path | None = None,
    extra_files: list[str | os.PathLike] = (),
    sets: list[str] = (),
    shallow: bool = False,
) -> ResolvedConfig:
    """Merge and validate the configuration of competition `comp`; raise PipelineError on any fault.

    `shallow` skips the checks that import a heavy library (albumentations' own check of
    `augment.transforms`): for `kp status`, which shows the cache without running anything.
    """
    root = (root or project_root()).resolve()
    configs = root / "configs"
    defaults_path = configs / DEFAULTS_FILE
    if not defaults_path.is_file():
        raise PipelineError(f"{defaults_path}: missing (the project root {root} has no configs/{DEFAULTS_FILE})")
    known = known_competitions(root)
    if not COMPETITION_NAME.fullmatch(comp):
        raise PipelineError(f"--comp {comp!r}: a competition is a plain name (letters, digits, '-', '_'), "
                            f"the name of a file in {configs}; known competitions: {', '.join(known) or 'none'}")
    comp_path = configs / f"{comp}.yaml"
    if not comp_path.is_file():
        raise PipelineError(f"unknown competition {comp!r}: there is no {comp_path}; "
                            f"known competitions: {', '.join(known) or 'none'}")

    merged: dict[str, Any] = {}
    provenance: dict[str, str] = {}
    files = [defaults_path]
    _merge(merged, _read_yaml(defaults_path), _display(defaults_path, root), provenance)
    layers = [comp_path]
    for extra in extra_files:
        if not Path(extra).is_file():
            raise PipelineError(f"--config {extra}: no such file")
        layers.append(Path(extra))
    for path in layers:  # each competition file or overlay may `extends:` another, merged before it
        for layer_path, layer in _overlay_chain(path):
            if not layer:
                print(f"warning: {layer_path}: empty, changes nothing", file=sys.stderr)
            files.append(layer_path)
            _merge(merged, layer, _display(layer_path, root), provenance)
    for assignment in sets:
        _apply_set(merged, assignment, provenance)

    model = _validate(merged, provenance, comp, shallow)
    resolved = ResolvedConfig(
        comp=comp,
        root=root,
        model=model,
        values=model.model_dump(mode="json"),
        provenance=provenance,
        files=files,
    )
    _check_predictions_read(resolved)
    _check_stage_list(resolved)
    return resolved


def _overlay_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """A competition file or overlay and the files it `extends:` (a path relative to it), base first."""
    if path.resolve() in seen:
        raise PipelineError(f"{path}: `extends:` loops back to it ({' -> '.join(map(str, seen))})")
    layer = _read_yaml(path)
    base = layer.pop("extends", None)
    if base is None:
        return [(path, layer)]
    base_path = path.parent / str(base)
    if not base_path.is_file():
        raise PipelineError(f"{path}: extends: {base}: no such file {base_path}")
    return [*_overlay_chain(base_path, (*seen, path.resolve())), (path, layer)]


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


MAX_NODES = 100_000  # values in one config file once its aliases (*name) are expanded; the real ones hold < 1,000
MAX_CONFIG_BYTES = 1 << 20  # a config file or --set value; the committed ones hold under 20,000 characters


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one silently), and
    a document of more than `MAX_NODES` values once its aliases are expanded: a few nested aliases
    (the "billion laughs") make a value of billions of items that every later step (validation, the
    fingerprint) would walk."""

    def construct_document(self, node):
        expanded = _expanded_size(node, {})
        if expanded > MAX_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases (*name) expand to more than {MAX_NODES:,} values: refused; write the values "
                "out", node.start_mark)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the earlier value would be silently ignored)",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for with every alias expanded (each node counted once per use;
    `sizes` remembers shared nodes, so this takes time in the document's size, not its expansion)."""
    if id(node) not in sizes:
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _load_yaml(text: str, where: str) -> Any:
    """`text` as YAML, every way it can fail one PipelineError naming `where`: malformed YAML, a file
    larger than `MAX_CONFIG_BYTES` (refused before it is parsed), nesting deeper than Python recurses,
    a number of more digits than Python converts."""
    if len(text) > MAX_CONFIG_BYTES:
        raise PipelineError(f"{where}: {len(text):,} characters, more than a config holds ({MAX_CONFIG_BYTES:,}; the "
                            "committed ones hold under 20,000): refused before it is read")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc)
        raise PipelineError(f"{at}: malformed YAML: {problem}") from None
    except RecursionError:
        raise PipelineError(f"{where}: nested too deeply to read (lists or mappings within each other hundreds of "
                            "levels down); a config is a few levels deep") from None
    except ValueError as exc:  # Python's own limits on a value, e.g. an integer of more than 4,300 digits
        raise PipelineError(f"{where}: a value YAML cannot turn into Python's ({str(exc).split(';')[0]})") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise PipelineError(f"{path}: {size:,} bytes, more than a config holds ({MAX_CONFIG_BYTES:,}; the "
                                "committed ones hold under 20,000): refused before it is read")
        text = read_text(path)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror})") from None
    data = _load_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict, layer: dict, source: str, provenance: dict[str, str], prefix: str = "") -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and (key not in base or isinstance(base[key], dict)):
            _merge(base.setdefault(key, {}), value, source, provenance, dotted + ".")
        else:
            base[key] = value
            for stale in [k for k in provenance if k == dotted or k.startswith(dotted + ".")]:
                del provenance[stale]
            provenance[dotted] = source


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """`dotted.key=value` as `--set` reads it: (the key, the value parsed as YAML).

    Raises:
        PipelineError: no `=`, no key, or a value that is not valid YAML, naming the assignment.
    """
    source = f"--set {assignment}"
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise PipelineError(f"{source}: expected dotted.key=value")
    shown = source if len(source) <= 120 else f"{source[:100]}... ({len(assignment):,} characters)"
    try:
        return key, _load_yaml(raw, shown) if raw.strip() else None
    except PipelineError as exc:
        if "malformed YAML" not in str(exc):
            raise
        raise PipelineError(
            f"{shown}: the value is not valid YAML ({str(exc).split('malformed YAML: ', 1)[1]}); "
            "quote a string that starts with {, [ or a colon: key='{id}.jpg'"
        ) from None


def _apply_set(merged: dict, assignment: str, provenance: dict[str, str]) -> None:
    key, value = parse_assignment(assignment)
    _set_dotted(merged, key, value, f"--set {assignment}", provenance)


def _set_dotted(merged: dict, key: str, value: Any, source: str, provenance: dict[str, str]) -> None:
    """Set `key` (dotted) in `merged` to `value`; an unknown key raises naming `source` and the keys there."""
    node = merged
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth]) or "the top level"
            choices = sorted(node) if isinstance(node, dict) else []
            hint = did_you_mean(part, choices)
            raise PipelineError(
                f"{source}: unknown key {key!r}: {where} has no key {part!r}{hint}"
                + (f"; keys there: {', '.join(choices)}" if choices else "")
            )
        if depth < len(parts) - 1:
            node = node[part]
    node[parts[-1]] = value
    for stale in [k for k in provenance if k == key or k.startswith(key + ".")]:
        del provenance[stale]
    provenance[key] = source


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_model() -> type[StrictModel]:
    """The pydantic model of a whole config: the fixed sections plus every stage's own section."""
    from pipeline.engine.registry import all_stages

    fields: dict[str, Any] = {
        "competition": (Competition, ...),
        "stages": (list[str], Field(["download", "split"], min_length=1, description=(
            "the stages this competition runs; the order comes from what each needs"))),
        "paths": (Paths, ...),
        "model": (Model, ...),
        "training": (Training, ...),
        "kaggle": (Kaggle, ...),
        "kernel": (Kernel, ...),
        "sweep": (Sweep, ...),
        "cache": (Cache, ...),
        "compute": (Compute, ...),
        "features": (dict[str, FeatureSet], Field({}, description=(
            "named feature sets (changes to precompute: backbone, weights, image_size...) that blend.sources use"))),
    }
    for stage in all_stages().values():
        fields[stage.section] = (stage.settings, ...)
    return create_model("Config", __base__=StrictModel, **fields)


def _validate(merged: dict, provenance: dict[str, str], comp: str, shallow: bool = False):
    model_cls = config_model()
    try:
        return model_cls.model_validate(merged, context={"shallow": shallow})
    except ValidationError as exc:
        problems = [_describe(error, model_cls, provenance) for error in exc.errors()]
        joined = problems[0] if len(problems) == 1 else "\n  " + "\n  ".join(problems)
        raise PipelineError(f"invalid configuration for competition {comp!r}: {joined}") from None


def _describe(error: dict, model_cls: type, provenance: dict[str, str]) -> str:
    loc = [str(part) for part in error["loc"]]
    dotted = ".".join(loc)
    source = source_of(dotted, provenance)
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model_cls, loc[:-1])
        hint = did_you_mean(loc[-1], allowed)
        spaced = f" (YAML reads {loc[-1]!r} as one key: put a space after the colon)" if ":" in loc[-1] else ""
        return f"{source}: {dotted}: unknown key{hint}{spaced}; allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{source}: {dotted}: missing value (every key needs one; see configs/{DEFAULTS_FILE})"
    value = error.get("input")
    message = error["msg"]
    if value is None and kind not in ("value_error",):
        return f"{source}: {dotted}: not set (null); {message}"
    return f"{source}: {dotted}: bad value {value!r}: {message}"


def source_of(dotted: str, provenance: dict[str, str]) -> str:
    """The file (or --set argument) that set a key, or the one(s) that set keys inside a section."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in provenance:
            return provenance[key]
        # an error on a whole section: name the file that set any key inside it
        inside = sorted({src for k, src in provenance.items() if k.startswith(key + ".")})
        if inside:
            return " / ".join(inside)
    return "config"


def _allowed_keys(model_cls: type, loc: list[str]) -> list[str]:
    """The keys the model allows at `loc` (list indices, `phases.0`, step into the list's items; a
    mapping's own names, `features.lite2`, into its values)."""
    current: Any = model_cls
    named = False  # the part after a mapping of names (`features`) is a name the user chose
    for part in loc:
        if part.isdigit() or named:
            named = False
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        named = typing.get_origin(annotation) is dict
        current = _model_in(annotation) or annotation
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside `Model | None`, `list[Model]` and the like, or None."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _check_stage_list(resolved: ResolvedConfig) -> None:
    from pipeline.engine.registry import all_stages

    known = all_stages()
    source = resolved.provenance.get("stages", "config")
    listed = list(resolved.model.stages)
    for name in listed:
        if name not in known:
            raise PipelineError(
                f"{source}: stages: unknown stage {name!r}{did_you_mean(name, list(known))}; "
                f"known stages: {', '.join(known)}"
            )
        if listed.count(name) > 1:
            raise PipelineError(f"{source}: stages: {name!r} is listed twice")
    for name in listed:
        missing = [upstream for upstream in known[name].needs_for(resolved) if upstream not in listed]
        if missing:
            raise PipelineError(f"{source}: stages: {name!r} needs {', '.join(map(repr, missing))}, which is not "
                                f"listed; got {listed}")


def _check_predictions_read(resolved: ResolvedConfig, where: str = "") -> None:
    """Every setting that names a predicting stage (`Stage.reads_predictions`) names one, other than its own
    stage and than a stage that reads it: the list of predicting stages comes from the registry."""
    from pipeline.engine.registry import all_stages, predicting_stages, with_needs

    known, predicting = all_stages(), predicting_stages()
    named = {stage.name: stage.reads_predictions(resolved.section(stage.section)) for stage in known.values()
             if stage.reads_predictions is not None and stage.name in resolved.model.stages}
    reads = {name: {*stage.needs, *named.get(name, {}).values()} for name, stage in known.items()}
    for stage, settings in named.items():
        for key, name in settings.items():
            source = (f"{where}: " if where else "") + source_of(key.partition("[")[0], resolved.provenance)
            if name not in predicting:
                raise PipelineError(f"{source}: {key}: {name!r} is not a predicting stage"
                                    f"{did_you_mean(name, list(predicting))}; one of {', '.join(predicting)}")
            if stage in with_needs([name], lambda n: reads.get(n, ())):
                raise PipelineError(f"{source}: {key}: {name!r} reads {stage} itself; {stage} must read a stage "
                                    "that predicts without it")
