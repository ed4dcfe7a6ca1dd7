"""Building blocks shared by every family; nothing here knows about tasks or models."""
from .attention import RelPosAttention2d, relative_position_index, window_merge, window_partition
from .conv import AvgPool2dSame, Conv2dSame, ConvNormAct, make_conv, reference_padding, same_padding, tf_same_pad
from .drop import DropPath, drop_path, survival_schedule
from .factories import get_act, get_norm
from .mbconv import MBConv
from .squeeze_excite import SqueezeExcite

__all__ = [
    "ConvNormAct", "Conv2dSame", "AvgPool2dSame", "make_conv", "reference_padding", "same_padding", "tf_same_pad",
    "get_act", "get_norm",
    "DropPath", "drop_path", "survival_schedule",
    "MBConv", "SqueezeExcite",
    "RelPosAttention2d", "relative_position_index", "window_partition", "window_merge",
]
