"""The calibrated profiles shipped in simulator/profiles/, and the roofline when none fits."""

import warnings
from pathlib import Path

from simulator.cost_model import CostModel
from simulator.gpu_specs import gpu_key, gpu_spec
from simulator.model_shape import ModelShape
from simulator.roofline import Roofline

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def profile_filename(gpu: str, model: str, tp: int, dtype: str) -> str:
    """The bundled file name of a profile: <gpu>_<model>_tp<k>_<dtype>.json."""
    return f"{gpu_key(gpu)}_{Path(model).name.lower()}_tp{tp}_{dtype}.json"


def available_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    """Names (file stems) of the bundled profiles."""
    return sorted(path.stem for path in directory.glob("*.json"))


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


def cost_model_for(
    gpu: str,
    model: str,
    tp: int = 1,
    dtype: str = "bfloat16",
    *,
    profile_path: str | Path | None = None,
    allow_roofline: bool = True,
):
    """A given profile file, else the bundled one, else (with a warning) the uncalibrated roofline."""
    if profile_path is not None:
        return CostModel.load(profile_path)
    try:
        return load_profile(gpu, model, tp, dtype)
    except FileNotFoundError as missing:
        if not allow_roofline:
            raise
        try:
            spec = gpu_spec(gpu)
        except KeyError as unknown:
            # A ValueError, so the CLI prints it as an error rather than a traceback.
            raise ValueError(f"{unknown.args[0]}; for another GPU pass --profile FILE (its calibrated cost model)") from None
        roofline = Roofline(spec, ModelShape.load(model), tp=tp, dtype=dtype)
        warnings.warn(f"{missing} Using the {roofline.label}.", stacklevel=2)
        return roofline


def step_predictor_of(run):
    """The cost model a simulated run used (kept in its metadata), as a predictor of step-table durations."""
    data = run.metadata.get("cost_model")
    if not data:
        return None
    cost_model = CostModel.from_json(data, source=f"{run.path}/metadata.json")
    return lambda steps: cost_model.predict_columns({name: steps.column(name).to_numpy() for name in steps.column_names})
