"""Offline teacher-logit caching for knowledge distillation: the command line, configuration and catalog."""
