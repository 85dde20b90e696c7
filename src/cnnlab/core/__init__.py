"""What everything else stands on: the checkpoint schema, the typed model and preprocessing
contract, the one image decoder, the batched pixel transforms, device choice, scores, atomic files.

Nothing here imports anything of cnnlab outside ``cnnlab.core``.
"""
