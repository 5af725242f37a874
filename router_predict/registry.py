"""Build a predictor by name from what the user gave: a trace to fit on, a model, a trained folder.

Each predictor needs different inputs; a missing one is a user error with a one-line message that
says which flag supplies it. Predictors that need torch training or safetensors are imported lazily.
"""
from __future__ import annotations

from moe_rt.errors import MoeRtError
from router_predict.base import Predictor
from router_predict.trace import Trace

PREDICTOR_NAMES = ("frequency", "coactivation", "gate_lookahead", "gate_lookahead_output", "learned", "path")
ROUTER_LOOKAHEADS = ("gate_lookahead", "gate_lookahead_output")  # training-free: the model's own routers


def _router_lookahead_class(name: str):
    if name == "gate_lookahead":
        from router_predict.predictors.gate_lookahead import GateLookaheadPredictor
        return GateLookaheadPredictor
    from router_predict.predictors.gate_lookahead_output import GateLookaheadOutputPredictor
    return GateLookaheadOutputPredictor


def build_predictor(name: str, *, fit_trace: Trace | None = None, model_dir: str | None = None,
                    predictor_dir: str | None = None, depth: int = 1) -> Predictor:
    """A ready predictor. fit_trace: rows to fit/train on (never the rows it will be judged on)."""
    if depth < 1:
        raise MoeRtError(f"look-ahead depth must be >= 1, got {depth}")
    if name == "frequency":
        from router_predict.predictors.frequency import FrequencyPredictor
        return FrequencyPredictor.fit(_need_trace(name, fit_trace))
    if name == "coactivation":
        from router_predict.predictors.coactivation import CoactivationPredictor
        return CoactivationPredictor.fit(_need_trace(name, fit_trace), depth)
    if name in ROUTER_LOOKAHEADS:
        if model_dir is None:
            raise MoeRtError(f"predictor {name} needs the model's router weights: pass --model DIR")
        return _router_lookahead_class(name).from_checkpoint(model_dir)
    if name == "learned":
        if predictor_dir is None and (fit_trace is None or fit_trace.hidden is None):
            raise MoeRtError("predictor learned needs a trained folder (--predictor-dir) or a fit trace "
                             "recorded with hidden states to train on")
        from router_predict.predictors.learned import LearnedPregate, train_pregate
        if predictor_dir is not None:
            return _check_depth(LearnedPregate.load(predictor_dir), depth)
        return train_pregate(fit_trace, depth).predictor
    if name == "path":
        if predictor_dir is None and (fit_trace is None or fit_trace.token_ids is None):
            raise MoeRtError("predictor path needs a trained folder (--predictor-dir) or a fit trace "
                             "with token_ids to train on")
        from router_predict.predictors.path import PathPredictor, train_path
        if predictor_dir is not None:
            return PathPredictor.load(predictor_dir)
        return train_path(fit_trace).predictor
    raise MoeRtError(f"unknown predictor {name!r}; choose from {', '.join(PREDICTOR_NAMES)}")


def build_predictor_for_model(name: str, model, *, predictor_dir: str | None, depth: int) -> Predictor:
    """A predictor to run online inside a loaded model (engine tracking, cache prefetch).

    gate_lookahead(_output) reads the model's own routers; learned/path load from predictor_dir;
    the id-only ones (frequency, coactivation) are fitted on the trace file predictor_dir names.
    """
    if name in ROUTER_LOOKAHEADS:
        return _router_lookahead_class(name).from_model(model)
    if name in ("frequency", "coactivation"):
        if predictor_dir is None or not str(predictor_dir).endswith(".npz"):
            raise MoeRtError(f"predictor {name} is fitted on a trace: set predictor_dir to a trace file "
                             "(.npz, from moe-rt trace)")
        from router_predict.trace import load_trace

        depth = max(1, min(depth, len(model.spec.moe_layer_ids) - 1))
        return build_predictor(name, fit_trace=load_trace(predictor_dir), depth=depth)
    return build_predictor(name, predictor_dir=predictor_dir, depth=depth)


def check_trace_fits(predictor: Predictor, trace: Trace) -> None:
    """The trace must carry what the predictor reads, and match its layer and expert counts."""
    if predictor.needs_hidden and trace.hidden is None:
        raise MoeRtError(f"predictor {predictor.name} needs hidden states but the trace has none "
                         "(record it with hidden capture)")
    if getattr(predictor, "needs_layer_output", False) and trace.layer_output is None:
        raise MoeRtError(f"predictor {predictor.name} needs layer outputs but the trace has none "
                         "(record it with moe-rt trace --with-layer-output)")
    if getattr(predictor, "needs_token_ids", False) and trace.token_ids is None:
        raise MoeRtError(f"predictor {predictor.name} needs token_ids but the trace has none")
    if (predictor.num_layers, predictor.num_experts) != (trace.num_layers, trace.num_experts):
        raise MoeRtError(f"predictor {predictor.name} is for {predictor.num_layers} MoE layers x "
                         f"{predictor.num_experts} experts but the trace has {trace.num_layers} x "
                         f"{trace.num_experts}")


def _need_trace(name: str, trace: Trace | None) -> Trace:
    if trace is None:
        raise MoeRtError(f"predictor {name} needs a trace to fit on (--fit-on FILE)")
    return trace


def _check_depth(predictor: Predictor, depth: int) -> Predictor:
    trained = getattr(predictor, "max_depth", depth)
    if depth > trained:
        raise MoeRtError(f"predictor {predictor.name} was trained for depth {trained} but depth {depth} "
                         "was asked; retrain with --depth")
    return predictor
