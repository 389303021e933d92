"""GradMAP (arXiv 2602.14649) as implemented here: the gradient metric (`metric`), the projection compensation
(`projection`), and gradmap_verify (`verify`, `verify_budget`), our step beyond the paper: the GradMAP screen
checked by SLEB's exact criterion. The paper's formulas are not public; each file says how it reads them."""
