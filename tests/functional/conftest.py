def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "functional: end-to-end training runs compared with golden values (tests/functional; "
        "select with `pytest tests/functional` or `-m functional`, skip with `-m 'not functional'`)",
    )
    config.addinivalue_line("markers", "cases(*names): the functional cases a test reads (each runs once per session)")
    config.addinivalue_line("markers", "with_reference: the test also reads its case's group reference run")
