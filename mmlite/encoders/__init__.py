"""Image and text encoders: CNN, patch embedding + ViT, GRU, text transformer, pooling (derived in chapters 3, 4.3)."""

from mmlite.encoders.cnn import CNNEncoder
from mmlite.encoders.gru import GRU, gru_cell
from mmlite.encoders.output import EncoderOutput
from mmlite.pooling import cls_pool, last_token_pool, masked_mean
from mmlite.encoders.text import GRUTextEncoder, TransformerTextEncoder
from mmlite.encoders.vit import PatchEmbedding, ViTEncoder

__all__ = [
    "CNNEncoder",
    "EncoderOutput",
    "GRU",
    "GRUTextEncoder",
    "PatchEmbedding",
    "TransformerTextEncoder",
    "ViTEncoder",
    "cls_pool",
    "gru_cell",
    "last_token_pool",
    "masked_mean",
]
