"""Checkpoints as projects save them: wrapper prefixes, Lightning and torchvision files, pickled refusals."""

import argparse

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bncal.cli import main
from bncal.errors import BncalError
from bncal.torch.loading import fit_state_dict, load_model, load_state_dict
from models import zoo

SPEC = f"{zoo.HERE / 'zoo.py'}:mnist_cnn"


@pytest.fixture(scope="module")
def state():
    return load_file(str(zoo.MNIST_STALE_CKPT))


def _same_weights(model, state):
    own = model.state_dict()
    return set(own) == set(state) and all(torch.equal(own[k], state[k]) for k in state)


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod.", "module._orig_mod.", "model.module."])
def test_wrapper_prefixes_are_removed_when_they_fit(tmp_path, state, prefix):
    path = tmp_path / "w.pt"
    torch.save(_prefixed(state, prefix), path)
    assert _same_weights(load_model(SPEC, weights=path), state)


def test_lightning_checkpoint(tmp_path, state):
    """``state_dict`` with ``model.`` keys beside a loss module's, hyper-parameters, optimizer states."""
    path = tmp_path / "epoch=3-step=131.ckpt"
    torch.save({"epoch": 3, "global_step": 131, "pytorch-lightning_version": "2.4.0",
                "state_dict": {**_prefixed(state, "model."), "criterion.weight": torch.ones(10)},
                "hyper_parameters": {"lr": 0.1, "width": 8},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}]}, path)
    assert _same_weights(load_model(SPEC, weights=path), state)
    code, output = run("inspect", SPEC, "--weights", path)
    assert code == 1 and "BN001 error" in output  # loaded: the stale statistics are found


def test_strip_prefix_option_and_ambiguity(tmp_path, state):
    net = tmp_path / "net.pt"
    torch.save(_prefixed(state, "net."), net)
    code, output = run("inspect", SPEC, "--weights", net)
    assert code == 1 and "the file's keys start with 'net.' where the model's do not: pass --strip-prefix net." in output
    code, output = run("inspect", SPEC, "--weights", net, "--strip-prefix", "net.")
    assert code == 1 and "BN001 error" in output
    code, output = run("inspect", SPEC, "--weights", net, "--strip-prefix", "student.")
    assert code == 1 and "no key in" in output and "starts with 'student.'" in output

    both = tmp_path / "both.pt"  # a model and an EMA copy under two wrapper prefixes
    torch.save({**_prefixed(state, "model."), **_prefixed(state, "module.")}, both)
    code, output = run("inspect", SPEC, "--weights", both)
    assert code == 1 and "after removing any of 'model.', 'module.'" in output and "--strip-prefix" in output
    assert _same_weights(load_model(SPEC, weights=both, strip_prefix="module."), state)


def test_fit_state_dict_takes_the_keys_as_they_are_when_they_fit():
    class Wrapper(torch.nn.Module):  # a model whose own keys start with "model."
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)

    wrapper = Wrapper()
    own = wrapper.state_dict()
    fitted, removed = fit_state_dict(own, wrapper)
    assert fitted is own and removed == ""
    fitted, removed = fit_state_dict(_prefixed(own, "module."), wrapper)
    assert set(fitted) == set(own) and removed == "module."
    # Keys that fit under no prefix are returned as they are; the strict load then names what is wrong.
    fitted, removed = fit_state_dict({"x": torch.zeros(1)}, wrapper)
    assert set(fitted) == {"x"} and removed == ""


def test_pickled_checkpoint_refusal_names_the_class(tmp_path, state):
    """torchvision's reference scripts save ``{"model": ..., "args": argparse.Namespace(...)}``."""
    path = tmp_path / "model_89.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1), "epoch": 89}, path)
    code, output = run("inspect", SPEC, "--weights", path)
    line = output.strip().splitlines()[-1]
    assert code == 1 and line == (
        f"error: {path} holds a pickled argparse.Namespace, which could execute code when loaded; pass "
        "--allow-pickle for a file you trust (from Python: torch.serialization.add_safe_globals([argparse.Namespace]) "
        "before loading, or allow_pickle=True), or save a plain state dict or safetensors")
    code, output = run("inspect", SPEC, "--weights", path, "--allow-pickle")
    assert code == 1 and "BN001 error" in output
    with pytest.raises(BncalError, match="argparse.Namespace"):
        load_state_dict(path)
    with torch.serialization.safe_globals([argparse.Namespace]):  # the library way: trust that one class
        assert _same_weights(load_model(SPEC, weights=path), state)
