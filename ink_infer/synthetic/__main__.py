"""``python -m ink_infer.synthetic``: write a synthetic Kaggle-layout dataset or segments (``fragments.main``)."""

from ink_infer.synthetic.fragments import main

raise SystemExit(main())
