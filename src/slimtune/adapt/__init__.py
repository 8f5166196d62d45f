"""Adaptation methods: layer anatomy (freezing, head-only, cascaded unfreezing) and LoRA through PEFT."""
