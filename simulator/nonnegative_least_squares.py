"""Least squares with every coefficient >= 0 (Lawson and Hanson's active-set method)."""

import numpy as np


def nonnegative_least_squares(matrix: np.ndarray, target: np.ndarray, *, max_iterations: int | None = None) -> np.ndarray:
    """argmin ||matrix @ x - target|| subject to x >= 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    num_rows, num_cols = matrix.shape
    if target.shape != (num_rows,):
        raise ValueError(f"target has shape {target.shape}, expected ({num_rows},)")
    # Unit-norm columns: the terms span many orders of magnitude (1 vs 1e9 attention pairs).
    norms = np.linalg.norm(matrix, axis=0)
    norms[norms == 0] = 1.0
    scaled = matrix / norms
    solution = np.zeros(num_cols)
    passive = np.zeros(num_cols, dtype=bool)
    tolerance = 10 * np.finfo(np.float64).eps * max(num_rows, num_cols) * max(1.0, np.abs(scaled).max())
    max_iterations = max_iterations or 3 * num_cols + 30
    for _ in range(max_iterations):
        gradient = scaled.T @ (target - scaled @ solution)
        candidates = ~passive & (gradient > tolerance)
        if not candidates.any():
            break
        passive[np.argmax(np.where(candidates, gradient, -np.inf))] = True
        while True:
            trial = np.zeros(num_cols)
            trial[passive] = np.linalg.lstsq(scaled[:, passive], target, rcond=None)[0]
            if (trial[passive] > 0).all():
                solution = trial
                break
            # Step back toward the last feasible point until a coefficient hits zero, then drop it.
            blocking = passive & (trial <= 0)
            step = np.min(solution[blocking] / (solution[blocking] - trial[blocking]))
            solution = solution + step * (trial - solution)
            passive &= solution > tolerance
            solution[~passive] = 0.0
    return solution / norms
