# make demo: install, prepare Tiny Shakespeare, pretrain a baby GPT, LoRA-fine-tune it, sample
# make test: install (with the test-only oracles of requirements-test.txt), check the format and lint
#            (ruff.toml), run the test suite
# make gpu-check: on a CUDA machine, the device tests on CUDA (compiled training of every adapter) and
#                 bench.py eager vs compiled, as a table
PYTHON ?= python3
# torch's own index, installed from first when set: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV ?= .venv
PY := $(VENV)/bin/python
# offline on any machine: testdata/ holds Tiny Shakespeare and tiktoken's GPT-2 ranks (prepare.py reads them)
SHAKESPEARE := testdata/tinyshakespeare.txt
export WANDB_MODE ?= offline

.PHONY: install install-test demo test gpu-check clean
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 --index-url $(TORCH_INDEX))
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

install-test: $(VENV)/.installed-test
$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

data/shakespeare_char/train.bin: | install
	$(PY) prepare.py shakespeare_char --input=$(SHAKESPEARE)

demo: install data/shakespeare_char/train.bin
	$(PY) train.py config/train_shakespeare_char.py --out_dir=out-demo-base --overwrite=True
	$(PY) train.py config/finetune_shakespeare_lora.py --init_from=out-demo-base --out_dir=out-demo-lora --overwrite=True
	$(PY) sample.py --out_dir=out-demo-lora --merge=True --num_samples=1 --max_new_tokens=300 --start="ROMEO:"
	$(PY) plots.py out-demo-base out-demo-lora

test: install-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

gpu-check: install-test
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs CUDA: install the CUDA build of torch (see README)')"
	$(PY) -m pytest -q test_device.py
	$(PY) bench.py --device=cuda --compile=both --out_dir=bench-gpu-check

clean:
	rm -rf out-demo-base out-demo-lora .pytest_cache
