"""`python -m training.crm`: train DIN with the recipe's defaults (training/configs/crm.yaml)."""

from training.crm.crm import load_config, main

main(load_config())
