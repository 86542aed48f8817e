"""A Gradio demo of mBLIP (Geigle et al., arXiv 2307.06930): an image and a prompt -> the generated answer / caption.

    python -m mmret_jax.demo_mblip --model DIR [--cpu] [--host 127.0.0.1] [--port 7860] [--dtype float32|bfloat16]

DIR is what `python -m mmret_jax.eval.generation --model` takes: a training workdir (its `model/` export) or a
converted mBLIP dir with its tokenizer and `mblip.json` (max_len, template, image_size, decoder_only). The same
path as the evaluation: the image resized to image_size x image_size (bicubic), /255, CLIP mean / std ->
pixels [1, H, W, 3]; the prompt `template.format(text)` tokenised as the eval rows (mT5: </s> appended, right
padded; BLOOM: no special tokens, left padded) -> input_ids / attention_mask [1, L]; `generate.generate` ->
new token ids [1, max_new_tokens], decoded with skip_special_tokens and stripped.

Generation settings default to the reference's (5 beams, min 1 new token); the "task" preset sets max new tokens
and length penalty: VQA / classification 10 and -1, caption 50 and 1 (`eval.generation.TASK_DEFAULTS`). Every
new prompt-length bucket / beam count / max new tokens compiles once (reported on stderr).

The core is `Demo(model_dir, dtype).answer(image, prompt, ...)`; `build_app(demo)` wraps it in a `gr.Blocks`
(endpoint `/answer`); `main(argv)` is the command. Gradio is imported only by `build_app` / `main` (the `demo`
extra: pip install -e '.[demo]'); `--cpu` sets JAX_PLATFORMS=cpu before JAX is first imported.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import numpy as np

PRESETS = {"vqa": "VQA / classification", "caption": "caption"}  # eval.generation.TASK_DEFAULTS keys -> labels
MAX_BEAMS = 16  # slider range; `answer` accepts any count >= 1
MAX_NEW_TOKENS = 200
ENDPOINT = "answer"
INSTALL_HINT = "pip install -e '.[demo]'"


class DemoInputError(ValueError):
  """A bad user input (no image, an empty prompt, an out-of-range setting); the message is shown as is."""


def _log(message: str) -> None:
  print(f"note: {message}", file=sys.stderr, flush=True)


def _int_setting(name: str, value: Any, minimum: int) -> int:
  try:
    f = float(value)
  except (TypeError, ValueError):
    raise DemoInputError(f"{name} must be a whole number, got {value!r}") from None
  if not math.isfinite(f) or f != int(f):
    raise DemoInputError(f"{name} must be a whole number, got {value!r}")
  if f < minimum:
    raise DemoInputError(f"{name} must be >= {minimum}, got {int(f)}")
  return int(f)


def check_settings(num_beams: Any, max_new_tokens: Any, min_new_tokens: Any,
                   length_penalty: Any) -> tuple[int, int, int, float]:
  """(num_beams >= 1, max_new_tokens >= 1, 0 <= min_new_tokens <= max_new_tokens, finite length_penalty), or a
  `DemoInputError` naming the bad one."""
  beams = _int_setting("number of beams", num_beams, 1)
  max_new = _int_setting("max new tokens", max_new_tokens, 1)
  min_new = _int_setting("min new tokens", min_new_tokens, 0)
  if min_new > max_new:
    raise DemoInputError(f"min new tokens ({min_new}) must be <= max new tokens ({max_new})")
  try:
    lp = float(length_penalty)
  except (TypeError, ValueError):
    raise DemoInputError(f"length penalty must be a number, got {length_penalty!r}") from None
  if not math.isfinite(lp):
    raise DemoInputError(f"length penalty must be finite, got {length_penalty!r}")
  return beams, max_new, min_new, lp


def check_template(template: Any) -> str:
  """`template` if it is a string with one `{}` slot for the prompt and no other format fields."""
  if not isinstance(template, str) or "{}" not in template:
    raise DemoInputError(f"the prompt template must contain {{}} (where the prompt goes), got {template!r}")
  try:
    template.format("")
  except (IndexError, KeyError, ValueError) as e:
    raise DemoInputError(f"the prompt template {template!r} must have exactly one {{}} and no other braces "
                         f"({type(e).__name__}: {e})") from None
  return template


class Demo:
  """An exported mBLIP model ready to answer one image + prompt at a time.

  Attributes: model, params, tokenizer, settings (`eval.generation.load_model`), template (settings' unless
  given), image_size, decoder_only, max_len.
  """

  def __init__(self, model_dir: str | os.PathLike, dtype: str = "float32", *, template: str | None = None,
               quant: str = "none"):
    from mmret_jax.data.sources import mblip_json  # pylint: disable=import-outside-toplevel
    from mmret_jax.eval import generation  # pylint: disable=import-outside-toplevel
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if not pathlib.Path(model_dir).exists():
      raise FileNotFoundError(f"model directory not found: {model_dir}")
    t0 = time.perf_counter()
    self.model, self.params, self.tokenizer, self.settings = generation.load_model(str(model_dir), dtype)
    self.params, self.quant = generation.quantize(self.model, self.params, quant)  # LLM int8 / int4 or float
    self.template = check_template(str(self.settings["template"]) if template is None else template)
    self.image_size = int(self.settings["image_size"])
    self.decoder_only = bool(self.settings["decoder_only"])
    self.max_len = int(self.settings["max_len"])
    self.image_config = mblip_json.eval_image_config(self.image_size)
    self._compiled: set[tuple[int, int, int]] = set()
    import jax  # pylint: disable=import-outside-toplevel
    _log(f"model loaded from {model_dir} in {time.perf_counter() - t0:.1f} s ({dtype}, LLM weights {quant}, "
         f"{'BLOOM' if self.decoder_only else 'mT0'} language model, {self.image_size}px images, template "
         f"{self.template!r}, JAX on {jax.devices()[0].platform})")

  def pixels(self, image: Any) -> Any:
    """float32 [1, H, W, 3] of a PIL image / path / array, as the evaluation's `MblipImages` (eval transform)."""
    from mmret_jax.data import image as image_lib  # pylint: disable=import-outside-toplevel
    if image is None:
      raise DemoInputError("no image: upload an image first")
    try:
      return image_lib.preprocess(image, self.image_config)[None]
    except (image_lib.BadImageError, FileNotFoundError, TypeError) as e:
      raise DemoInputError(f"cannot read the image ({e})") from None

  def prompt_ids(self, prompt: str | None, template: str | None = None) -> tuple[Any, Any, str]:
    """(input_ids, attention_mask) int32 [1, L] and the full prompt text, tokenised as `eval.generation.predict`."""
    from mmret_jax.data.sources import mblip_json  # pylint: disable=import-outside-toplevel
    template = self.template if template is None or template == "" else check_template(template)
    prompt = "" if prompt is None else str(prompt)
    if not prompt.strip() and not template.replace("{}", "").strip():
      raise DemoInputError("empty prompt: type a question or instruction (the template adds no text)")
    ids, labels = mblip_json.tokenize_rows(self.tokenizer, [prompt], [""], decoder_only=self.decoder_only,
                                           max_len=self.max_len, template=template)
    if not ids[0]:
      raise DemoInputError("the prompt has no tokens")
    batch = mblip_json.collate(ids, labels, pad_id=self.tokenizer.pad_token_id, decoder_only=self.decoder_only)
    return batch["input_ids"], batch["attention_mask"], template.format(prompt)

  def answer(self, image: Any, prompt: str | None, *, num_beams: int = 5, max_new_tokens: int = 10,
             min_new_tokens: int = 1, length_penalty: float = -1.0, template: str | None = None) -> str:
    """The generated text (skip_special_tokens, stripped) for `image` (PIL image, path or array) and `prompt`
    (put into `template`, default the model's). Raises `DemoInputError` on bad input."""
    from mmret_jax import generate as gen_lib  # pylint: disable=import-outside-toplevel
    beams, max_new, min_new, lp = check_settings(num_beams, max_new_tokens, min_new_tokens, length_penalty)
    pixels = self.pixels(image)
    ids, mask, text = self.prompt_ids(prompt, template)
    key = (-(-ids.shape[1] // 16), beams, max_new)  # generate's default length_bucket of 16 tokens
    first = key not in self._compiled
    if first:
      _log(f"first call with {beams} beam(s), {max_new} new tokens, prompt bucket {16 * key[0]}: compiling")
    t0 = time.perf_counter()
    tokens = gen_lib.generate(self.model, self.params, pixels, ids, mask, num_beams=beams, max_new_tokens=max_new,
                              min_new_tokens=min_new, length_penalty=lp, quant=self.quant)
    out = self.tokenizer.decode(np.asarray(tokens)[0].tolist(), skip_special_tokens=True).strip()
    if first:
      self._compiled.add(key)
      _log(f"compiled and generated in {time.perf_counter() - t0:.1f} s")
    _log(f"{text!r} -> {out!r}")
    return out


def _import_gradio():
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio as gr  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"the demo needs gradio ({e}): {INSTALL_HINT}") from None
  return gr


def build_app(demo: Demo, title: str = "mBLIP"):
  """A `gr.Blocks` around `demo.answer`: image, prompt, template, task preset and beam settings -> text; its
  API endpoint is `/answer` (image, prompt, template, num_beams, max_new_tokens, min_new_tokens,
  length_penalty)."""
  from mmret_jax.eval.generation import TASK_DEFAULTS  # pylint: disable=import-outside-toplevel
  gr = _import_gradio()
  max_new, lp = TASK_DEFAULTS["vqa"]

  def run(image, prompt, template, num_beams, max_new_tokens, min_new_tokens, length_penalty):
    try:
      return demo.answer(image, prompt, num_beams=num_beams, max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, length_penalty=length_penalty, template=template or None)
    except DemoInputError as e:
      raise gr.Error(str(e)) from None

  def preset(task):
    n, p = TASK_DEFAULTS[task]
    return n, p

  with gr.Blocks(title=title, analytics_enabled=False) as app:
    gr.Markdown(f"# {title}\nAn image and a prompt in any language; the model answers or captions. The prompt "
                "goes into the template's `{}`.")
    with gr.Row():
      with gr.Column():
        image = gr.Image(type="pil", image_mode="RGB", label="image")
        prompt = gr.Textbox(label="prompt", lines=2, placeholder="e.g. What is in the picture?")
        template = gr.Textbox(label="prompt template ({} = the prompt)", value=demo.template)
        task = gr.Radio([(label, key) for key, label in PRESETS.items()], value="vqa", label="task preset")
        with gr.Accordion("generation settings", open=False):
          num_beams = gr.Slider(1, MAX_BEAMS, value=5, step=1, label="number of beams (1 = greedy)")
          max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=max_new, step=1, label="max new tokens")
          min_new_tokens = gr.Slider(0, MAX_NEW_TOKENS, value=1, step=1, label="min new tokens")
          length_penalty = gr.Slider(-2.0, 2.0, value=lp, step=0.1, label="length penalty")
        button = gr.Button("generate", variant="primary")
      with gr.Column():
        output = gr.Textbox(label="answer", lines=4)
    task.change(preset, inputs=[task], outputs=[max_new_tokens, length_penalty], api_name=False)
    inputs = [image, prompt, template, num_beams, max_new_tokens, min_new_tokens, length_penalty]
    button.click(run, inputs=inputs, outputs=[output], api_name=ENDPOINT)
    prompt.submit(run, inputs=inputs, outputs=[output], api_name=False)
  return app


def main(argv: Sequence[str] | None = None) -> int:
  from mmret_jax import cli  # pylint: disable=import-outside-toplevel
  p = cli.ArgumentParser(prog="python -m mmret_jax.demo_mblip", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="a training workdir or a converted mBLIP dir (+ tokenizer)")
  p.add_argument("--cpu", action="store_true", help="run JAX on the CPU even if an accelerator is present")
  p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 = every interface)")
  p.add_argument("--port", type=int, default=7860, help="port to serve on")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  p.add_argument("--template", default=None, help="prompt template, {} = the prompt (default: the model's "
                 "mblip.json template, else {})")
  p.add_argument("--quant", default="none", choices=("none", "int8", "int4"), help="the LLM's block matrices "
                 "weight-only int8 / int4 (qwix; pip install -e '.[quant]')")
  p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
  a = p.parse_args(argv)
  if not 0 < a.port < 65536:
    p.error(f"--port must be in 1..65535, got {a.port}")
  if a.template is not None:
    check_template(a.template)
  if a.cpu:
    if "jax" in sys.modules:
      print("warning: --cpu: JAX was already imported; JAX_PLATFORMS=cpu may come too late", file=sys.stderr)
    os.environ["JAX_PLATFORMS"] = "cpu"
  _import_gradio()  # before the (slow) model load
  if not pathlib.Path(a.model).exists():
    raise FileNotFoundError(f"model directory not found: {a.model}")
  demo = Demo(a.model, a.dtype, template=a.template, quant=a.quant)
  app = build_app(demo)
  _log(f"serving on http://{a.host}:{a.port} (Ctrl-C to stop)")
  try:
    app.launch(server_name=a.host, server_port=a.port, share=a.share, ssr_mode=False, show_error=True)
  finally:
    app.close()
  return 0


if __name__ == "__main__":
  from mmret_jax import cli as _cli  # pylint: disable=import-outside-toplevel
  sys.exit(_cli.run(main))
