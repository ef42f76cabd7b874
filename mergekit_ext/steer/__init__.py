"""Steering vectors: extraction, run-time steering, the refusal direction, orthogonalization,
abliteration, bundle audits and llama.cpp control-vector files.

Layer L is the output of decoder block L (`hidden_states[L + 1]`) everywhere in this package.
"""

from mergekit_ext.steer.apply import generate, steering
from mergekit_ext.steer.bundle import SteeringBundle, load_bundle, load_vector, save_bundle, verify_bundle
from mergekit_ext.steer.data import ContrastivePair, load_instructions, load_pairs
from mergekit_ext.steer.extract import extract_steering_vector
from mergekit_ext.steer.orthogonalize import orthogonalize_vector
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import SteeringRecipe, SteeringVector

__all__ = [
    "ContrastivePair",
    "PromptTemplate",
    "SteeringBundle",
    "SteeringRecipe",
    "SteeringVector",
    "extract_steering_vector",
    "generate",
    "load_bundle",
    "load_instructions",
    "load_pairs",
    "load_vector",
    "orthogonalize_vector",
    "save_bundle",
    "steering",
    "verify_bundle",
]
