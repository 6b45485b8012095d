"""``python -m polytask``: the ``polytask`` command, e.g. under torchrun across machines::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m polytask train CONFIG
"""

from polytask.cli import main

main()
