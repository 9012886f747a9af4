u() {
  f="${REX_HOME:-$HOME/.rex}/run/$1.id"
  [ -f "$f" ] || return 1
  IFS=' ' read -r p s d t o x < "$f" || return 1
  [ -z "$x" ] && [ "$t" = "$2" ] && [ "$d" = "$3" ] || return 1
  [ -z "$o" ] || [ "$o" = "$4" ] || return 1
  case $p in ''|*[!0-9]*) return 1;; esac
  [ "$p" -gt 1 ] || return 1
  read -r l < "/proc/$p/stat" || return 1
  l=${l##*") "}
  set -f
  set -- $l
  [ "$#" -ge 20 ] && [ "$1" != Z ] || return 1
  shift 19
  [ "$1" = "$s" ] || return 1
  printf '{"ok": true, "unchanged": true, "pid": %s}\n' "$p"
}
u "$1" "$2" "$3" "$4" 2>/dev/null && exit 0
u "${2##*.}" "$2" "$3" "$4" 2>/dev/null && exit 0
shift 4
exec "$@"
