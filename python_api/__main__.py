from fa3.cli import main

raise SystemExit(main())
