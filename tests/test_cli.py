"""The command line: help everywhere, one-line errors and non-zero exits on bad arguments."""

import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ar_course", *args], capture_output=True, text=True, timeout=timeout)


def test_help():
    res = run("--help")
    assert res.returncode == 0 and "doctor" in res.stdout and "grade" in res.stdout and "train" in res.stdout


def test_no_arguments_prints_help_and_fails():
    res = run()
    assert res.returncode == 2 and "usage" in res.stdout


def test_unknown_command():
    res = run("frobnicate")
    assert res.returncode == 2
    assert "unknown command 'frobnicate'" in res.stderr


def test_train_lists_trainers_and_rejects_unknown():
    res = run("train", "--help")
    assert res.returncode == 0 and "classifier" in res.stdout
    bad = run("train", "nothing")
    assert bad.returncode == 2 and "unknown trainer 'nothing'" in bad.stderr


@pytest.mark.parametrize("command", ["grade", "doctor"])
def test_subcommand_help(command):
    res = run(command, "--help")
    assert res.returncode == 0 and "usage" in res.stdout


def test_doctor_reports_and_passes_here():
    res = run("doctor")
    assert "numba CUDA simulator" in res.stdout and "torch" in res.stdout
    assert res.returncode == 0, res.stdout


def test_bench_table_and_bad_name():
    res = run("bench", "--table")
    assert res.returncode == 0
    bad = run("bench", "no_such_benchmark")
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr
