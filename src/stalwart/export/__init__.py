"""Export to and import from Hugging Face model folders."""
