#!/bin/sh
# attach-eperm: the ioctls need CAP_SYS_ADMIN. An unprivileged user (uid 1000) who can open the
# device nodes (mode 666) still gets EPERM from attach, and cannot detach a root's filter.
# disks: 256M 256M
# needs: module migrate
# timeout: 120
. /tests/lib.sh

load_module
must chmod 666 /dev/vda /dev/vdb
as_user() {
	su -s /bin/sh user -c "$*"
}
expect_eq "$(as_user id -u)" 1000 "uid of the test user"
as_user "dd if=/dev/vda of=/dev/null bs=4k count=1 2>/dev/null" || fail "user cannot open /dev/vda (the test needs open() to work)"
as_user "dd if=/dev/zero of=/dev/vdb bs=4k count=1 conv=notrunc 2>/dev/null" || fail "user cannot write /dev/vdb (the test needs open() to work)"

step "attach as uid 1000"
expect_errno EPERM as_user "migrate attach /dev/vda /dev/vdb"
expect_no_filter /dev/vda

step "detach of root's filter as uid 1000"
run_capture migrate attach /dev/vda /dev/vdb
[ "$RC" -eq 0 ] || fail "migrate attach as root failed (exit $RC): $(head -c 300 "$ERR" | tr '\n' ' ')"
expect_errno EPERM as_user "migrate detach /dev/vda"
expect_mode /dev/vda clone
must migrate detach /dev/vda
expect_no_filter /dev/vda
unload_module
echo ok
