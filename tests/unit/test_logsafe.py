from mdm_server.logsafe import describe


def _fail(phone: str) -> None:
    raise ValueError(f"cannot parse {phone}")


def test_describe_withholds_the_message_but_says_where() -> None:
    phone = "+316" + "1234" + "5678"  # built at run time: source lines are in tracebacks
    try:
        _fail(phone)
    except ValueError as exc:
        text = describe(exc)
    assert phone not in text
    assert "ValueError" in text
    assert "_fail" in text
