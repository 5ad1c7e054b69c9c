"""``python -m fastbn.bench``: see `fastbn.bench`."""

from fastbn.bench import main

main()
