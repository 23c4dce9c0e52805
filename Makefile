# Two commands for a new user: `make demo` and `make test` (each creates .venv when needed).
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_data
DEMO_EPOCHS ?= 5

.PHONY: venv demo test lint

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: venv
	$(PY) -m datasets.demo --output_dir $(DEMO_DIR)
	$(PY) main_dino_mc.py --arch vit_tiny --patch_size 16 --data_mode mc --data_path $(DEMO_DIR)/seco \
		--output_dir $(DEMO_DIR)/pretrain --epochs $(DEMO_EPOCHS) --batch_size_per_gpu 16 --out_dim 4096 \
		--warmup_epochs 1 --lr 0.002 --num_workers 2 --seed 0 --print_freq 5 \
		--global_crops_scale 0.32 1 --local_crops_number 4
	$(PY) eval_knn.py --arch vit_tiny --patch_size 16 --pretrained_weights $(DEMO_DIR)/pretrain/checkpoint.pth \
		--compare_random --data_path $(DEMO_DIR)/eurosat --output_dir $(DEMO_DIR)/knn --nb_knn 5 10 20 \
		--batch_size_per_gpu 32 --num_workers 2

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
