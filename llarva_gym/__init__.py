"""Gymnasium environments for RLBench tasks, embedded on MuJoCo. Importing registers `llarva/<task>` ids."""
