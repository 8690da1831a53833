from mamba_train.export.hf import export_hf, hf_config, hf_state_dict

__all__ = ["export_hf", "hf_config", "hf_state_dict"]
