"""Publishing an export: the Hugging Face Hub upload."""
