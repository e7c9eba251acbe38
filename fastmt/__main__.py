from fastmt.cli import main

raise SystemExit(main())
