"""The mBLIP Gradio demo (`demo_mblip.py`) on a freshly initialised exported `mblip_mt0:smoke` model: `Demo.answer`
against the evaluation path called directly (MblipImages pixels, tokenize_rows + collate, `generate.generate`,
decode), the same answers through a real Gradio server driven by `gradio_client`, and the error paths."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402

from mmret_jax import cli, demo_mblip  # noqa: E402
from mmret_jax import generate as gen_lib  # noqa: E402
from mmret_jax.data.sources import mblip_json  # noqa: E402
from mmret_jax.train.partitioning import make_mesh  # noqa: E402

from fixtures import override  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import mblip_mt0  # noqa: E402  pylint: disable=wrong-import-position

IMAGES = ("green_circle_2.png", "yellow_square_2.png")
PROMPTS = ("Caption the image in French.", "De quelle couleur est la forme ?")
GREEDY = dict(num_beams=1, max_new_tokens=6, min_new_tokens=1, length_penalty=1.0)
BEAMS = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)  # the VQA defaults


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """The workdir of a freshly initialised `mblip_mt0:smoke` model exported as a training run does."""
  from mmret_jax.tasks.mblip import MBlipTask  # pylint: disable=import-outside-toplevel
  w = tmp_path_factory.mktemp("demo")
  c = override(mblip_mt0.get_config("smoke"), {"checkpoint.async_save": False, "data.val_size": 2})
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    task = MBlipTask(c, mesh, pathlib.Path(w))
  task.export(nn.unbox(task.init_params(jax.random.PRNGKey(0))), w / "model")
  return w


@pytest.fixture(scope="module")
def demo(exported):
  return demo_mblip.Demo(exported)


def image_path(name: str) -> pathlib.Path:
  return mblip_json.sample_root() / "images" / name


def reference(demo, name: str, prompt: str, settings: dict, template: str = "{}") -> str:
  """The evaluation's path (eval.generation.predict's steps) on one row, called directly."""
  root = mblip_json.sample_root()
  images = mblip_json.MblipImages(mblip_json.ImageResolver([root / "images"]), demo.image_size, 1)
  ids, labels = mblip_json.tokenize_rows(demo.tokenizer, [prompt], [""], decoder_only=False, max_len=128,
                                         template=template)
  batch = mblip_json.collate(ids, labels, pad_id=demo.tokenizer.pad_token_id, decoder_only=False)
  tokens = gen_lib.generate(demo.model, demo.params, images([(name,)]), batch["input_ids"], batch["attention_mask"],
                            **settings)
  return demo.tokenizer.decode(np.asarray(tokens)[0].tolist(), skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def answers(demo):
  """{(image, prompt, setting): (demo's answer, reference answer)}."""
  out = {}
  for name, prompt in zip(IMAGES, PROMPTS):
    for key, settings in (("greedy", GREEDY), ("beams", BEAMS)):
      with PIL.Image.open(image_path(name)) as img:
        got = demo.answer(img, prompt, **settings)
      out[name, prompt, key] = got, reference(demo, name, prompt, settings)
  return out


def test_demo_loads_the_export_settings(demo):
  assert demo.template == "{}" and not demo.decoder_only and demo.max_len == 128
  assert demo.image_size == mblip_mt0.get_config("smoke").data.image_size


def test_pixels_equal_the_eval_images(demo):
  root = mblip_json.sample_root()
  images = mblip_json.MblipImages(mblip_json.ImageResolver([root / "images"]), demo.image_size, 1)
  for name in IMAGES:
    want = images([(name,)])
    with PIL.Image.open(image_path(name)) as img:
      got = demo.pixels(img)  # an in-memory PIL image, as Gradio hands it over
    assert got.shape == want.shape == (1, demo.image_size, demo.image_size, 3)
    np.testing.assert_array_equal(got, want)
    # RGBA input: alpha dropped, as the eval transform's convert("RGB")
    with PIL.Image.open(image_path(name)) as img:
      np.testing.assert_array_equal(demo.pixels(img.convert("RGBA")), want)


def test_answer_equals_generate_and_decode(demo, answers):
  for (name, prompt, key), (got, want) in answers.items():
    assert got == want, (name, prompt, key)
    assert got, (name, prompt, key)  # min_new_tokens=1: at least one word of the tokenizer's vocabulary
  # the prompt goes into the template: "Describe: {}" differs from "{}" and equals the direct path with it
  with PIL.Image.open(image_path(IMAGES[0])) as img:
    got = demo.answer(img, PROMPTS[0], template="Describe: {}", **GREEDY)
  assert got == reference(demo, IMAGES[0], PROMPTS[0], GREEDY, template="Describe: {}")
  # empty prompt: allowed when the template has text
  with PIL.Image.open(image_path(IMAGES[0])) as img:
    got = demo.answer(img, "", template="Describe the image. {}", **GREEDY)
  assert got == reference(demo, IMAGES[0], "", GREEDY, template="Describe the image. {}")


def test_int8_answers_are_the_dequantized_models(exported, demo):
  """`--quant int8`: the demo's answers equal the float path on the dequantized LLM weights (q * scale)."""
  from mmret_jax.models import quant  # pylint: disable=import-outside-toplevel
  q8 = demo_mblip.Demo(exported, quant="int8")
  assert q8.quant is not None and q8.quant.bits == 8
  deq = {**q8.params, "language_model": quant.dequantize_params(q8.params["language_model"])}
  with PIL.Image.open(image_path(IMAGES[0])) as img:
    got = q8.answer(img, PROMPTS[0], **GREEDY)
  q8.params, q8.quant = deq, None
  with PIL.Image.open(image_path(IMAGES[0])) as img:
    assert got == q8.answer(img, PROMPTS[0], **GREEDY)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_gradio_server_gives_the_same_answers(demo, answers):
  from gradio_client import Client, handle_file  # pylint: disable=import-outside-toplevel
  from gradio_client.exceptions import AppError  # pylint: disable=import-outside-toplevel
  app = demo_mblip.build_app(demo)
  port = free_port()
  try:
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True,
               ssr_mode=False, show_error=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    for (name, prompt, key), (_, want) in answers.items():
      s = GREEDY if key == "greedy" else BEAMS
      got = client.predict(handle_file(str(image_path(name))), prompt, "", s["num_beams"], s["max_new_tokens"],
                           s["min_new_tokens"], s["length_penalty"], api_name=f"/{demo_mblip.ENDPOINT}")
      assert got == want, (name, prompt, key)
    # the template box: the model's template shown, "" meaning it too; another one is used
    got = client.predict(handle_file(str(image_path(IMAGES[0]))), PROMPTS[0], "Describe: {}", 1, 6, 1, 1.0,
                         api_name="/answer")
    assert got == reference(demo, IMAGES[0], PROMPTS[0], GREEDY, template="Describe: {}")
    # bad input: the user sees the message
    bad = [((None, "What?", "", 5, 10, 1, -1.0), "no image"),
           ((handle_file(str(image_path(IMAGES[0]))), "What?", "", 2, 3, 4, -1.0), "min new tokens (4) must be <="),
           ((handle_file(str(image_path(IMAGES[0]))), "  ", "", 1, 6, 1, 1.0), "empty prompt"),
           ((handle_file(str(image_path(IMAGES[0]))), "What?", "Q:", 1, 6, 1, 1.0), "must contain {}")]
    for args, msg in bad:
      with pytest.raises(AppError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        client.predict(*args, api_name="/answer")
    client.close()
  finally:
    app.close()


@pytest.mark.parametrize("settings, msg", [
    (dict(num_beams=0), "number of beams must be >= 1"),
    (dict(num_beams=2.5), "number of beams must be a whole number"),
    (dict(max_new_tokens=0), "max new tokens must be >= 1"),
    (dict(min_new_tokens=-1), "min new tokens must be >= 0"),
    (dict(max_new_tokens=3, min_new_tokens=4), r"min new tokens \(4\) must be <= max new tokens \(3\)"),
    (dict(length_penalty=float("nan")), "length penalty must be finite"),
    (dict(length_penalty="abc"), "length penalty must be a number"),
    (dict(num_beams=None), "number of beams must be a whole number"),
])
def test_bad_settings_are_clear_errors(demo, settings, msg):
  with PIL.Image.open(image_path(IMAGES[0])) as img:
    with pytest.raises(demo_mblip.DemoInputError, match=msg):
      demo.answer(img, "What?", **settings)


def test_bad_inputs_are_clear_errors(demo, tmp_path):
  with pytest.raises(demo_mblip.DemoInputError, match="no image: upload an image first"):
    demo.answer(None, "What?")
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  with pytest.raises(demo_mblip.DemoInputError, match="cannot read the image"):
    demo.answer(str(broken), "What?")
  with PIL.Image.open(image_path(IMAGES[0])) as img:
    with pytest.raises(demo_mblip.DemoInputError, match="empty prompt"):
      demo.answer(img, "   ")  # the export's template "{}" adds no text
    with pytest.raises(demo_mblip.DemoInputError, match="must contain {}"):
      demo.answer(img, "What?", template="Question:")
    with pytest.raises(demo_mblip.DemoInputError, match="exactly one {}"):
      demo.answer(img, "What?", template="{} and {}")


def run_main(args, capsys):
  try:
    rc = cli.run(demo_mblip.main, args)
  except SystemExit as e:
    rc = e.code
  err = capsys.readouterr().err
  return rc, err


def test_main_errors_are_one_line(exported, tmp_path, capsys, monkeypatch):
  cases = [
      (["--model", str(tmp_path / "nope")], 1, f"error: model directory not found: {tmp_path / 'nope'}"),
      (["--model", str(exported), "--port", "0"], 2, "error: --port must be in 1..65535, got 0"),
      (["--model", str(exported), "--dtype", "float16"], 2, "invalid choice: 'float16'"),
      (["--model", str(exported), "--template", "Q:"], 1, "must contain {}"),
      (["--model", str(tmp_path)], 1, "error: "),  # exists, but holds no model
  ]
  for args, code, msg in cases:
    rc, err = run_main(args, capsys)
    assert rc == code and msg in err and "Traceback" not in err, (args, err)
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
  monkeypatch.setitem(sys.modules, "gradio", None)  # as if gradio were not installed
  rc, err = run_main(["--model", str(exported)], capsys)
  assert rc == 1 and "pip install -e '.[demo]'" in err and "Traceback" not in err, err


def test_import_needs_neither_gradio_nor_jax():
  code = "import sys, mmret_jax.demo_mblip; print(sorted(m for m in ('gradio', 'jax') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
  assert out.stdout.strip() == "[]", out
