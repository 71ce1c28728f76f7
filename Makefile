# The two README commands: `make demo` (whole chain on the embedded synthetic data) and `make test`.
# Both create .venv on first use. Override the TensorFlow package per machine:
#   make test TF_PACKAGE='tensorflow[and-cuda]==2.21.*'     # GPU box
#   make demo TF_PACKAGE=none                               # Kaggle/Colab/TPU VM: keep the shipped TF
# requirements-beam.txt (Apache Beam, ~11 s to install) is in, so tests/test_beam.py runs under `make test`.
PYTHON ?= python3
VENV ?= .venv
TF_PACKAGE ?= tensorflow-cpu==2.21.*
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-beam.txt
	test -x $(PY) || $(PYTHON) -m venv $(if $(filter none,$(TF_PACKAGE)),--system-site-packages,) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(filter none,$(TF_PACKAGE)),,"$(TF_PACKAGE)") -r requirements.txt -r requirements-dev.txt \
		-r requirements-beam.txt
	touch $@

test: venv
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

demo: venv
	$(PY) bench/demo.py

clean:
	rm -rf tfrecords/*.tfrec tfrecords/*.json tfrecords/*.csv folds/*.csv runs submissions reports
