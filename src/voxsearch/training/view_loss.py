"""Instance discrimination between two views of the same studies (symmetric InfoNCE, SimCLR-style).

Text alignment alone teaches what a report says, and studies that say the same thing (normal heads of
one modality) collapse together: search by scan then cannot tell one patient's scan from another's,
and a rescan of the same patient is not found first. Two independently augmented views of each study
(new noise, contrast, a few voxels and degrees of motion) must find each other among the batch's
other studies, every one of which is a negative here, including those with the same findings.
"""

from __future__ import annotations


def view_loss(first, second, temperature: float):
    """(B, E) and (B, E) L2-normalised embeddings of two views of the same B studies, row i with row i."""
    import torch
    import torch.nn.functional as F

    if first.shape != second.shape:
        raise ValueError(f"view embeddings differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
    logits = first @ second.T / temperature
    target = torch.arange(first.shape[0], device=first.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
