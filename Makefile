# tsquant: `make demo` runs TSQ on Fashion-MNIST from the zoo checkpoint; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: install demo test lint fashion-mnist clean-demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,onnx]"
	touch $@

install: $(BIN)/.installed

fashion-mnist:
	@test -f $(FMNIST) || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

demo: install fashion-mnist
	$(BIN)/tsquant run configs/demo_fashion_mnist.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean-demo:
	rm -rf runs/demo_fashion_mnist
