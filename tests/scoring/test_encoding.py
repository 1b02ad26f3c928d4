"""The one fits-in-context rule (issue 19: it was written out three times): a prompt fits when the prefix,
the query and its longest label word but for that word's last token fit the model's positions."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from icldistill.scoring.encoding import fits_in_context, scored_length

token_rows = st.lists(st.integers(min_value=0, max_value=99), max_size=12)
label_words = st.lists(st.lists(st.integers(min_value=0, max_value=99), min_size=1, max_size=5), min_size=1,
                       max_size=4)


@settings(max_examples=200, deadline=None)
@given(prefix=st.integers(min_value=0, max_value=50), query=token_rows, words=label_words,
       max_length=st.integers(min_value=1, max_value=80))
def test_a_prompt_fits_exactly_when_its_fed_tokens_fit(prefix, query, words, max_length):
    fed = prefix + len(query) + max(len(w) for w in words) - 1  # the last label token is never fed
    assert scored_length(prefix, query, words) == fed
    assert fits_in_context(prefix, query, words, max_length) == (fed <= max_length)


@given(prefix=st.integers(min_value=0, max_value=50), query=token_rows, words=label_words)
def test_one_token_label_words_cost_no_position(prefix, query, words):
    single = [[w[0]] for w in words]
    assert scored_length(prefix, query, single) == prefix + len(query)
    assert scored_length(prefix, query, words) >= scored_length(prefix, query, single)
    # a longer word of another class can only make the prompt longer, never shorter
    assert scored_length(prefix, query, [*words, [1] * 6]) >= scored_length(prefix, query, words)
