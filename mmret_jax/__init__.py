"""mmret_jax: multimodal retrieval models (BLaIR, Bi-BLIP4CIR, UniIR, mBLIP, BagFormer) in JAX/Flax."""

__version__ = "0.1.0"


def load(path, **kw):
  """Loads a converted mmret_jax dir or a Hugging Face dir; returns an `embed.Encoder`
  with `.encode_text(list[str]) -> np.ndarray [N, D]`."""
  from mmret_jax import embed  # pylint: disable=import-outside-toplevel
  return embed.load(path, **kw)
