"""A user's mistake ends every entry point with one `ERROR:` line and exit code 2, never a trace.

Run through the real scripts: the wrapping that hid our messages (Hydra's
`InstantiationException`) only exists there.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from tests.conftest import CONF, ROOT, SYNTHETIC_OVERRIDES, TINY_OVERRIDES
from visioncare.cli import HYDRA_FULL_KEY, run_task, user_error_message
from visioncare.composition import compose_config, composition_error_message
from visioncare.errors import ConfigurationError


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "src" / script), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _assert_one_error_line(done: subprocess.CompletedProcess, *fragments: str) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output[-3000:]
    assert "Error in call to target" not in output, output[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        # Raised in our own constructors, which Hydra's instantiate calls.
        (["model.backbone=efficientnet_v2s"], ["backbone='efficientnet_v2s'", "efficientnetv2_s"]),
        (["data.image_size=224", "data.cache_size=100"], ["cache_size (100)", "cache_size=null"]),
        (["data.batch_size=0"], ["data.batch_size=0", "integer >= 1"]),
        (["model.pretrained=imagenet"], ["model.pretrained='imagenet'", "offline"]),
        # Checked before training, not when the operating point is chosen after it.
        (["target_sensitivity=85"], ["target_sensitivity=85", "(0, 1]"]),
        # Lightning's MisconfigurationException from the Trainer's constructor.
        (["trainer.max_epochs=-3"], ["trainer: ", "`trainer.max_epochs`", "-1", "-3"]),
        # Checked against Lightning's accelerator registry before the data is read.
        (["trainer.accelerator=nope"], ["trainer.accelerator=nope", "auto, cpu, cuda, gpu"]),
        # Found by Hydra while composing, before the task runs.
        (["data.batchsize=8"], ["data.batchsize is not a config key", "+data.batchsize="]),
        (["model=nope"], ["Could not find 'model/nope'", "options in 'model': effv2s", "tiny"]),
    ],
)  # fmt: skip
def test_train_config_mistakes_are_one_error_line(
    tmp_path, synthetic_root, cache_dir, overrides, fragments
):
    done = _run(
        "train.py", *TINY_OVERRIDES, *SYNTHETIC_OVERRIDES, "logger=none",
        f"data.root={synthetic_root}", f"paths.cache_dir={cache_dir}",
        f"paths.log_dir={tmp_path / 'logs'}", *overrides,
    )  # fmt: skip
    _assert_one_error_line(done, *fragments)
    assert not list((tmp_path / "logs").glob("**/*.ckpt"))  # stopped before training


@pytest.mark.slow
def test_eval_predict_export_mistakes_are_one_error_line(tmp_path, tiny_checkpoint):
    logs = f"paths.log_dir={tmp_path / 'logs'}"
    ckpt = f"ckpt_path={tiny_checkpoint}"
    _assert_one_error_line(
        _run("eval.py", ckpt, logs, "device=bogus"), "device='bogus' is not a torch device"
    )
    _assert_one_error_line(
        _run("predict.py", ckpt, logs, f"input={tmp_path}", "num_workers=-1"),
        "num_workers=-1",
        "integer >= 0",
    )
    # Checked before any image is predicted, not when the intervals or flags are computed.
    _assert_one_error_line(
        _run("eval.py", ckpt, logs, "bootstrap.level=95.0"), "bootstrap.level=95.0", "(0, 1)"
    )
    _assert_one_error_line(
        _run("predict.py", ckpt, logs, f"input={tmp_path}", "+quality.foo=1"),
        "quality.foo is not a quality threshold",
        "quality.too_dark",
    )
    # A required `???` key left out: OmegaConf's MissingMandatoryValue.
    _assert_one_error_line(_run("export.py", logs), "ckpt_path is required", "ckpt_path=")


def test_real_bugs_inside_instantiate_keep_their_traceback():
    def bug(_cfg):
        try:
            raise ZeroDivisionError("a bug in a constructor")
        except ZeroDivisionError as cause:
            raise InstantiationException("Error in call to target\nfull_key: model") from cause

    with pytest.raises(ZeroDivisionError, match="a bug in a constructor") as error:
        run_task(bug, None)
    assert error.traceback[-1].name == "bug"  # the original frame, not Hydra's wrapper


def _wrapped(cause: Exception, key: str) -> InstantiationException:
    wrapped = InstantiationException(f"Error in call to target\nfull_key: {key}")
    wrapped.__cause__ = cause
    return wrapped


def test_wrapped_user_errors_are_unwrapped_to_their_message():
    cause = ConfigurationError("data.cache_size (100) must be >= data.image_size (224)")
    assert user_error_message(_wrapped(cause, "data")) == str(cause)
    unknown = TypeError("VisionCareModule.__init__() got an unexpected keyword argument 'colour'")
    assert user_error_message(_wrapped(unknown, "model")).startswith("model.colour is not a known")
    cfg = OmegaConf.create({"model": {"colour": 1}})
    assert user_error_message(_wrapped(unknown, "model"), cfg).startswith("model.colour is not")
    other = OmegaConf.create({"model": {"backbone": "x"}})  # our own call passed `colour`: a bug
    assert user_error_message(_wrapped(unknown, "model"), other) is None
    assert user_error_message(_wrapped(TypeError("bad operand"), "model")) is None
    assert user_error_message(ValueError("a bug")) is None


def test_run_task_exits_2_with_the_message(capsys):
    def mistake(_cfg):
        raise ConfigurationError("model.backbone='x' is not a timm model")

    with pytest.raises(SystemExit) as stop:
        run_task(mistake, None)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "ERROR: model.backbone='x' is not a timm model"


# The library texts cli.py still reads, each triggered by the library itself (no subprocess):
# an upgrade that changes one fails here instead of printing a traceback to the user.


def _instantiate_error(node: dict) -> InstantiationException:
    with pytest.raises(InstantiationException) as raised:
        instantiate(OmegaConf.create(node)[next(iter(node))])
    return raised.value


def test_lightning_trainer_flag_message_names_the_config_key():
    error = _instantiate_error({"trainer": {"_target_": "lightning.Trainer", "max_epochs": -3}})
    assert HYDRA_FULL_KEY.search(str(error)).group(1) == "trainer"
    message = user_error_message(error)
    assert message.startswith("trainer: ") and "`trainer.max_epochs`" in message, message
    assert "-3" in message


def test_unknown_keyword_of_an_instantiated_target_names_the_key():
    node = {"model": {"_target_": "textwrap.dedent", "text": "x", "colour": 1}}
    cfg = OmegaConf.create(node)
    message = user_error_message(_instantiate_error(node), cfg)
    assert message == "model.colour is not a known key here; check its spelling or remove it"


def test_broken_interpolation_names_its_key():
    cfg = OmegaConf.create({"data": {"root": "${paths.nope}", "mean": "${nope:1}"}})
    for key in ("root", "mean"):
        with pytest.raises(InterpolationResolutionError) as raised:
            cfg.data[key]
        message = user_error_message(raised.value)
        assert message.startswith(f"data.{key}: ") and "\n" not in message, message


def _composition_error(*overrides: str) -> str:
    with pytest.raises((ConfigCompositionException, OverrideParseException)) as raised:
        compose_config(CONF, "train", overrides)
    return composition_error_message(raised.value, "train.py")


def test_composition_mistakes_are_one_line_by_exception_type():
    assert _composition_error("data.batchsize=8") == (
        "data.batchsize is not a config key: check its spelling (all keys: "
        "`python src/train.py --cfg job`), or add a new key with +data.batchsize=..."
    )
    assert _composition_error("model=nope") == (
        "Could not find 'model/nope'; available options in 'model': effv2s, lite0, tiny"
    )
    for overrides in (["+trainer.max_epochs=3"], ["data.x=[1"], ["~nope"]):
        message = _composition_error(*overrides)
        assert "\n" not in message and message, overrides
    assert "Could not find" in _composition_error("model=nope", "+trainer.max_epochs=3")


def test_composing_inside_a_running_app_restores_it():
    compose_config(CONF, "train", ["model=tiny"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        running = GlobalHydra.instance().hydra
        assert compose_config(CONF, "train", ["model=tiny"]).model.backbone
        assert GlobalHydra.instance().hydra is running
    assert not GlobalHydra.instance().is_initialized()
