"""The MobileDets architecture search (TuNAS, as the MobileDets paper uses it): search space, supernet,
latency cost model, controller, loop."""
from .controller import Controller, abs_reward
from .latency import LatencyModel, fit_latency_model, measure_latency
from .search import run_search
from .space import SPACES, SearchSpace, from_arch, get_space, sample, save_arch, to_arch, validate_arch
from .supernet import SuperDetector, export_weights

__all__ = ["Controller", "abs_reward", "LatencyModel", "fit_latency_model", "measure_latency", "run_search",
           "SPACES", "SearchSpace", "from_arch", "get_space", "sample", "save_arch", "to_arch", "validate_arch",
           "SuperDetector", "export_weights"]
