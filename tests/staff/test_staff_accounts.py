"""Staff accounts: login, roles, logout, lockout, admin-only account management, the audit log."""

import pytest
from tests.support import ADMIN_PASSWORD, DATABASES, make_staff, open_session, staff_login


@pytest.fixture(params=DATABASES)
def database_backend(request) -> str:
    """Every hub and store in this module runs on SQLite and on PostgreSQL (conftest.py)."""
    return request.param


def test_the_first_admin_logs_in_and_sees_who_they_are(hub):
    auth = staff_login(hub)
    me = hub.get("/api/staff/me", headers=auth).json()
    assert me["username"] == "admin" and me["role"] == "admin"


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(hub):
    wrong = hub.post("/api/staff/login", json={"username": "admin", "password": "nope-nope-nope"})
    unknown = hub.post("/api/staff/login", json={"username": "ghost", "password": "nope-nope-nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert "不正确" in wrong.json()["message"]


def test_repeated_failures_lock_the_account_for_a_while(hub):
    for _ in range(5):
        assert hub.post("/api/staff/login", json={"username": "admin", "password": "x" * 12}).status_code == 401
    locked = hub.post("/api/staff/login", json={"username": "admin", "password": ADMIN_PASSWORD})
    assert locked.status_code == 429 and "15分钟" in locked.json()["message"]


def test_after_logout_the_token_is_dead(hub):
    auth = staff_login(hub)
    assert hub.post("/api/staff/logout", headers=auth).status_code == 204
    assert hub.get("/api/staff/me", headers=auth).status_code == 401


def test_only_admins_manage_accounts(hub):
    agent = make_staff(hub, "agent1", "agent", display_name="王小明")
    supervisor = make_staff(hub, "sup1", "supervisor")
    for auth in (agent, supervisor):
        assert hub.get("/api/staff/users", headers=auth).status_code == 403
        r = hub.post(
            "/api/staff/users", json={"username": "x1", "password": "p" * 12, "role": "admin"}, headers=auth
        )
        assert r.status_code == 403
    users = {u["username"]: u["role"] for u in hub.get("/api/staff/users", headers=staff_login(hub)).json()}
    assert users == {"admin": "admin", "agent1": "agent", "sup1": "supervisor"}


def test_a_resident_token_is_not_a_staff_token(hub):
    _, resident = open_session(hub)
    assert hub.get("/api/staff/me", headers=resident).status_code == 401
    assert hub.get("/api/staff/users", headers=resident).status_code == 401


def test_disabling_an_account_ends_its_sessions(hub):
    agent = make_staff(hub, "agent2", "agent")
    admin = staff_login(hub)
    assert hub.patch("/api/staff/users/agent2", json={"active": False}, headers=admin).status_code == 200
    assert hub.get("/api/staff/me", headers=agent).status_code == 401
    r = hub.post("/api/staff/login", json={"username": "agent2", "password": "agent2-password-123"})
    assert r.status_code == 401


def test_account_changes_and_logins_are_audited_without_passwords(hub):
    make_staff(hub, "agent3", "agent")
    admin = staff_login(hub)
    hub.patch("/api/staff/users/agent3", json={"password": "a-new-password-1"}, headers=admin)
    log = hub.get("/api/staff/audit", headers=admin).json()
    actions = [(e["actor"], e["action"], e["target"]) for e in log]
    assert ("admin", "user.create", "agent3") in actions
    assert ("admin", "user.update", "agent3") in actions
    assert ("agent3", "login", "") in actions
    assert "a-new-password-1" not in str(log)


def test_concurrent_wrong_passwords_from_one_address_lock_after_five(hub):
    """Issue 19: checking the lockout, verifying and recording were not atomic, so wrong passwords sent
    at the same time from one address all got 401 (all guesses tried) before any lockout."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(_):
        return hub.post("/api/staff/login", json={"username": "admin", "password": "wrong-password-x"}).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = sorted(pool.map(attempt, range(8)))
    assert codes == [401] * 5 + [429] * 3, codes
    assert hub.post("/api/staff/login", json={"username": "admin", "password": ADMIN_PASSWORD}).status_code == 429


def test_user_names_are_unique_without_regard_to_case(hub):
    admin = staff_login(hub)
    make_staff(hub, "LiMing", "agent")
    for name in ("liming", "LIMING", "Admin"):
        r = hub.post("/api/staff/users", json={"username": name, "password": "p" * 12, "role": "agent"}, headers=admin)
        assert r.status_code == 409 and "不区分大小写" in r.json()["message"], (name, r.text)
    users = [u["username"] for u in hub.get("/api/staff/users", headers=admin).json()]
    assert sorted(users) == ["LiMing", "admin"]
