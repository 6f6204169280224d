"""Which cost model predicts a (GPU, model, TP, dtype): the profiles shipped in simulator/profiles/, in order of trust.

An explicit profile file (a calibrated JSON or an operator-profile Parquet) wins; then the bundled calibrated
profile of exactly this (gpu, model, tp, dtype); then a model composed from the GPU's bundled operator profile
(<gpu>_operators.parquet); then the uncalibrated roofline, with a warning. `kind` forces one of the three.
"""

import warnings
from pathlib import Path

import numpy as np

from engine.stats import BatchFeatures
from simulator import composed, cost_model, roofline
from simulator.composed import ComposedCostModel
from simulator.cost_model import CostModel
from simulator.gpu_specs import gpu_key, gpu_spec
from simulator.model_shape import ModelShape
from simulator.operator_tables import OperatorProfile
from simulator.roofline import Roofline

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
KINDS = ("calibrated", "composed", "roofline")


def profile_filename(gpu: str, model: str, tp: int, dtype: str) -> str:
    """The bundled file name of a profile: <gpu>_<model>_tp<k>_<dtype>.json."""
    return f"{gpu_key(gpu)}_{Path(model).name.lower()}_tp{tp}_{dtype}.json"


def operator_profile_filename(gpu: str) -> str:
    """The bundled file name of a GPU's operator profile: <gpu>_operators.parquet."""
    return f"{gpu_key(gpu)}_operators.parquet"


def available_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    """Names (file stems) of the bundled profiles."""
    return sorted(path.stem for path in directory.glob("*.json"))


def available_operator_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    """File names of the bundled operator profiles."""
    return sorted(path.name for path in Path(directory).glob("*_operators.parquet"))


def load_profile(gpu: str, model: str, tp: int = 1, dtype: str = "bfloat16", *, directory: Path = PROFILES_DIR) -> CostModel:
    """The bundled calibrated cost model of (gpu, model, tp, dtype); a clear error lists those available."""
    path = Path(directory) / profile_filename(gpu, model, tp, dtype)
    if not path.is_file():
        available = available_profiles(Path(directory))
        raise FileNotFoundError(
            f"no calibrated profile for gpu={gpu_key(gpu)} model={model} tp={tp} dtype={dtype} "
            f"(looked for {path}); available: {', '.join(available) or 'none'}. "
            f"Profile the GPU with `twinfer profile`, pass --profile FILE, or use the uncalibrated roofline."
        )
    return CostModel.load(path)


def _interconnect_bandwidth(gpu: str) -> float | None:
    try:
        return gpu_spec(gpu).interconnect_bandwidth
    except KeyError:
        return None


def composed_model(gpu: str, model: str, tp: int = 1, dtype: str = "bfloat16", *,
                   operator_profile: str | Path | None = None,
                   directory: Path = PROFILES_DIR, max_model_len: int | None = None,
                   async_scheduling: bool = False) -> ComposedCostModel:
    """A model composed from an operator profile (given, else the GPU's bundled one); clear errors when missing.
    max_model_len and async_scheduling: the engine's (its decode graphs' block-table width, None: the profile's;
    whether the host's work overlaps the device's)."""
    path = Path(operator_profile) if operator_profile is not None else Path(directory) / operator_profile_filename(gpu)
    if not path.is_file():
        available = available_operator_profiles(Path(directory))
        raise FileNotFoundError(
            f"no operator profile for gpu={gpu_key(gpu)} (looked for {path}); available: "
            f"{', '.join(available) or 'none'}. Time the GPU's operators with `twinfer profile --operators`."
        )
    return ComposedCostModel(ModelShape.load(model), OperatorProfile.read(path), tp=tp, dtype=dtype,
                             interconnect_bandwidth=_interconnect_bandwidth(gpu), max_model_len=max_model_len,
                             async_scheduling=async_scheduling)


def roofline_model(gpu: str, model: str, tp: int = 1, dtype: str = "bfloat16") -> Roofline:
    """The analytic roofline of a known GPU."""
    try:
        spec = gpu_spec(gpu)
    except KeyError as unknown:
        # A ValueError, so the CLI prints it as an error rather than a traceback.
        raise ValueError(f"{unknown.args[0]}; for another GPU pass --profile FILE (its calibrated cost model "
                         "or operator profile)") from None
    return Roofline(spec, ModelShape.load(model), tp=tp, dtype=dtype)


def _explicit(path: Path, gpu: str, model: str, tp: int, dtype: str, kind: str | None, engine: dict):
    operators = path.suffix == ".parquet"
    found = "composed" if operators else "calibrated"
    if kind not in (None, found):
        raise ValueError(f"--profile {path} is {'an operator profile' if operators else 'a calibrated profile'}, "
                         f"which gives a {found} cost model, not a {kind} one")
    if operators:
        return composed_model(gpu, model, tp, dtype, operator_profile=path, **engine)
    return CostModel.load(path)


def cost_model_for(
    gpu: str,
    model: str,
    tp: int = 1,
    dtype: str = "bfloat16",
    *,
    profile_path: str | Path | None = None,
    kind: str | None = None,
    allow_roofline: bool = True,
    profiles_dir: Path = PROFILES_DIR,
    operator_profiles_dir: Path = PROFILES_DIR,
    max_model_len: int | None = None,
    async_scheduling: bool = False,
):
    """The most trusted cost model there is for these (see the module docstring); kind "calibrated",
    "composed" or "roofline" (None or "auto": any) asks for one and fails clearly when it cannot be had.
    max_model_len, async_scheduling: the engine's, which a composed model depends on (its decode graphs' width,
    None: the profile's; whether host and device overlap)."""
    engine = {"max_model_len": max_model_len, "async_scheduling": async_scheduling}
    kind = None if kind == "auto" else kind
    if kind not in (None, *KINDS):
        raise ValueError(f"cost model kind {kind!r} is unknown; choose auto, {', '.join(KINDS)}")
    if profile_path is not None:
        return _explicit(Path(profile_path), gpu, model, tp, dtype, kind, engine)
    if kind == "calibrated":
        return load_profile(gpu, model, tp, dtype, directory=profiles_dir)
    if kind == "composed":
        return composed_model(gpu, model, tp, dtype, directory=operator_profiles_dir, **engine)
    if kind == "roofline":
        return roofline_model(gpu, model, tp, dtype)
    try:
        return load_profile(gpu, model, tp, dtype, directory=profiles_dir)
    except FileNotFoundError as no_calibrated:
        reasons = [str(no_calibrated)]
    try:
        return composed_model(gpu, model, tp, dtype, directory=operator_profiles_dir, **engine)
    except FileNotFoundError as no_operators:
        reasons.append(str(no_operators))
    except ValueError as incomplete:  # the GPU's operator profile lacks something this model needs
        reasons.append(f"The composed model cannot be built: {incomplete}.")
    if not allow_roofline:
        raise FileNotFoundError(" ".join(reasons))
    fallback = roofline_model(gpu, model, tp, dtype)
    warnings.warn(f"{' '.join(reasons)} Using the {fallback.label}.", stacklevel=2)
    return fallback


def cost_model_from_json(data: dict, source: str = "cost model"):
    """Any cost model from its to_json() form, by the form's format (calibrated, composed or roofline)."""
    readers = {cost_model.FORMAT: CostModel, composed.FORMAT: ComposedCostModel, roofline.FORMAT: Roofline}
    reader = readers.get(data.get("format") if isinstance(data, dict) else None)
    if reader is None:
        raise ValueError(f"{source}: unknown cost model format {data.get('format') if isinstance(data, dict) else data!r}; "
                         f"known: {', '.join(readers)}")
    return reader.from_json(data, source=source)


def step_predictor_of(run):
    """The cost model a simulated run used (kept in its metadata), as a predictor of step-table durations."""
    data = run.metadata.get("cost_model")
    if not data:
        return None
    model = cost_model_from_json(data, source=f"{run.path}/metadata.json")
    if hasattr(model, "predict_columns"):
        return lambda steps: model.predict_columns({name: steps.column(name).to_numpy() for name in steps.column_names})
    return lambda steps: _predict_rows(model, steps)


def _predict_rows(model, steps) -> np.ndarray:
    """predict() row by row, for cost models without a vectorized form (the roofline)."""
    names = list(BatchFeatures._fields)
    columns = [steps.column(name).to_pylist() for name in names]
    graphs = steps.column("cuda_graph_batch_size").to_pylist()
    return np.array([model.predict(BatchFeatures(*values), graph) for *values, graph in zip(*columns, graphs)])
