"""Who may see a run: the `Viewer` a request gets from the server's policy, and the runs shared by opening them."""

from types import SimpleNamespace

from explorer.serving import ServerPolicy, Viewer
from explorer.viewer import Shares, owner_of


def test_a_visitor_is_its_user_else_its_session():
    assert owner_of(SimpleNamespace(username="ada", session_hash="x")) == "user:ada"
    assert owner_of(SimpleNamespace(username=None, session_hash="x")) == "session:x"
    assert owner_of(None) == "session:anonymous"


def test_a_viewer_sees_its_own_runs_and_those_shared_with_it_and_deletes_only_its_own():
    viewer = ServerPolicy(public_gallery=False).viewer("me", ["theirs"])
    assert viewer == Viewer("me", frozenset({"theirs"}), gallery=False)
    assert viewer.may_see("me", "r1") and viewer.may_see("you", "theirs")
    assert not viewer.may_see("you", "r2") and not viewer.may_see(None, "r3")
    assert viewer.may_delete("me") and not viewer.may_delete("you") and not viewer.may_delete(None)
    assert viewer.visible({"r1": "me", "r2": "you", "theirs": "you"}, ["r2", "theirs", "r1", "gone"]) == [
        "theirs", "r1"]
    gallery = ServerPolicy(public_gallery=True).viewer("me")
    assert gallery.may_see("you", "r2") and gallery.may_see(None, "gone")  # everyone's runs, listed
    assert not gallery.may_delete("you")  # but only the owner deletes


def test_shares_keep_each_visitors_newest_runs():
    shares = Shares(keep=3)
    shares.add("me", ["a", "b"])
    shares.add("me", ["b", "c", "d"])
    assert shares.of("me") == {"b", "c", "d"} and shares.of("you") == frozenset()
