#!/usr/bin/env bash
# The main job on the embedded default (README): set-up, format a volume (SQLite metadata +
# a local object directory), mount it, run a real workload (a file round trip with
# checksums and a short fio job), show what happened, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CURVEFS=".venv/bin/curvefs"
DIR=${CURVEFS_DEMO_DIR:-/tmp/curvefs-demo}
MP="$DIR/mnt"
cleanup() {
  if mountpoint -q "$MP" 2>/dev/null; then $CURVEFS umount "$MP" || fusermount3 -uz "$MP" || true; fi
}
trap cleanup EXIT
cleanup
rm -rf "$DIR"; mkdir -p "$MP"
echo "== format"
$CURVEFS format "sqlite3://$DIR/demo.db" demo --storage file --bucket "$DIR/objects"
echo "== mount"
$CURVEFS mount "sqlite3://$DIR/demo.db" "$MP" -d --cache-dir "$DIR/cache" --log "$DIR/curvefs.log"
echo "== file round trip (64 MiB random data, sha256 before and after a remount)"
head -c 64M /dev/urandom > "$DIR/sample.bin"
cp "$DIR/sample.bin" "$MP/sample.bin"
mkdir -p "$MP/dir/sub"; ln -s ../sample.bin "$MP/dir/link"
$CURVEFS umount "$MP"
$CURVEFS mount "sqlite3://$DIR/demo.db" "$MP" -d --cache-dir "$DIR/cache" --log "$DIR/curvefs.log"
a=$(sha256sum < "$DIR/sample.bin" | cut -d' ' -f1); b=$(sha256sum < "$MP/dir/link" | cut -d' ' -f1)
echo "local  $a"; echo "curvefs $b"
[ "$a" = "$b" ] || { echo "CHECKSUM MISMATCH"; exit 1; }
ls -la "$MP" "$MP/dir"
echo "== fio: sequential write 1 MiB blocks (end_fsync), then random 4 KiB reads"
fio --name=seqwrite --directory="$MP" --rw=write --bs=1M --size=128M --end_fsync=1 --numjobs=1 \
    --group_reporting | grep -E "WRITE:|write:"
fio --name=seqwrite --directory="$MP" --rw=randread --bs=4k --size=128M --runtime=10 --time_based \
    --invalidate=0 --numjobs=1 --group_reporting | grep -E "READ:|read:"
echo "== statfs"; df -h "$MP"
echo "== daemon counters (.stats, excerpt)"
grep -E "^(fuse_op_(read|write|lookup|getattr)_count|cache_(mem|disk)_hits|cache_misses|object_(get|put)_count) " "$MP/.stats" || true
if $CURVEFS stats --help >/dev/null 2>&1; then $CURVEFS stats "$MP" --json | head -c 2000; echo; fi
echo "== objects in the store: $(find "$DIR/objects" -type f | wc -l) files, $(du -sh "$DIR/objects" | cut -f1)"
$CURVEFS umount "$MP"
echo "== done: volume in $DIR (remount: $CURVEFS mount sqlite3://$DIR/demo.db $MP)"
