"""ManiDP: Manifold Regularized Dynamic Network Pruning, trained and deployed fast.

``manidp.models``  gated and dense ResNets;  ``manidp.losses``  the ManiDP losses;
``manidp.train``   the trainer and ``manidp-train``;  ``manidp.flops`` MAC accounting;
``manidp.preprocess``  raw images to model inputs;  ``manidp.checkpoint``  checkpoint files;
``manidp.deploy``  compile a trained model into a :class:`DynamicResNet` engine.
The design is docs/DESIGN.md (section 4 maps each piece to its module).
"""

__version__ = "0.1.0"

from .deploy import DynamicResNet, compile  # noqa: E402
from .pretrained import default_model, default_model_info  # noqa: E402

__all__ = ["DynamicResNet", "compile", "default_model", "default_model_info", "__version__"]
